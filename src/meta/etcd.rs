//! A small blocking client for etcd 3.4's v3 API through its JSON gateway (`POST /v3/...` on
//! the client port), over `ureq`.
//!
//! Why the gateway and not gRPC: the daemon's threads are blocking threads, and the gateway is
//! served by every etcd 3.4 member on its client URL with no extra process; a gRPC client would
//! bring an async runtime and code generation for the handful of calls the cluster metadata
//! needs (range, put, delete, txn, leases, watch). The JSON quirks live in [`wire`].
//!
//! Endpoints: a call goes to the endpoint that answered last; when it cannot be reached
//! (refused, reset, timed out) the call moves on to the next one, within the call's one
//! `timeout` (each endpoint but the last gets half of what is left, see [`attempt_budget`]). An answer from etcd, an error status included, is final: it is what the cluster
//! decided, and another member would decide the same.
//!
//! At-least-once: a mutation whose connection broke after it was sent may have been applied
//! before it is retried on the next endpoint. A put then simply happens twice; a txn's retry sees
//! its own first effect (a create-if-absent then reports `succeeded: false`), so a caller that
//! must tell compares against a value only it writes.

mod wire;

use std::io::{self, BufReader, Read};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use wire::{b64, unb64};

/// etcd's lease id; 0 means "no lease".
pub type LeaseId = i64;

/// The biggest answer read from etcd, unary answers and each watch message alike. etcd's own
/// request limit is 1.5 MiB per value and a range may return many; 64 MiB bounds what a
/// misbehaving or huge answer can make us allocate.
pub const MAX_ANSWER_BYTES: u64 = 64 << 20;

/// The longest a connect may take before the next endpoint is tried. Members sit on one
/// network, where a connect takes well under a millisecond; a host that is down does not
/// answer at all, and waiting the whole call timeout for it would leave no time for the others.
const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(1);

/// The least time an attempt on one endpoint gets while the call has it: a round trip to a
/// healthy member that commits through raft takes a few milliseconds.
const MIN_ATTEMPT: Duration = Duration::from_millis(250);

/// One key as etcd stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The revision of the put that created the key (since its last delete).
    pub create_revision: i64,
    /// The revision of the last put to the key.
    pub mod_revision: i64,
    /// Puts since the key was created: 1 after the first.
    pub version: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

/// How a [`Compare`] relates the key's field (left) to the given operand (right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// A txn guard on one key. A key that does not exist has version, create and mod revision 0,
/// so `Version(key, Equal, 0)` means "absent" (create-if-absent).
#[derive(Debug, Clone)]
pub enum Compare {
    Version(Vec<u8>, Cmp, i64),
    CreateRevision(Vec<u8>, Cmp, i64),
    ModRevision(Vec<u8>, Cmp, i64),
    Value(Vec<u8>, Cmp, Vec<u8>),
    Lease(Vec<u8>, Cmp, LeaseId),
}

/// One operation of a txn branch. etcd refuses a txn that puts or deletes one key twice.
#[derive(Debug, Clone)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        /// 0 = no lease.
        lease: LeaseId,
    },
    Delete(Vec<u8>),
    DeletePrefix(Vec<u8>),
    Get(Vec<u8>),
    GetPrefix(Vec<u8>),
}

/// If every `compare` holds, run `success`, else `failure`: atomically, at one revision.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

#[derive(Debug, Clone)]
pub struct TxnResult {
    /// Whether every compare held (the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the txn (unchanged if its branch wrote nothing).
    pub revision: i64,
    /// One entry per op of the branch taken; Get/GetPrefix ops give their kvs, others an
    /// empty Vec.
    pub responses: Vec<Vec<Kv>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a [`Watch`].
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// The key after a put; for a delete only `key` and `mod_revision` (the delete's revision)
    /// are set.
    pub kv: Kv,
}

/// What can go wrong talking to etcd, by what the caller does next: `Unreachable` — retry
/// later; `Status` — etcd refused the request, it will refuse it again; `Compacted` — re-read
/// the state and watch from the new revision; `WatchClosed`/`WatchIdle`/`WatchCanceled` —
/// start a new watch from the last revision seen + 1.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("bad etcd endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        endpoint: String,
        reason: &'static str,
    },
    /// No endpoint answered within the call's timeout; `endpoint` is the last one tried.
    #[error("etcd unreachable (last tried {endpoint})")]
    Unreachable {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// etcd (or its gateway) answered with an error; `code` is the gRPC status code (5 = not
    /// found, e.g. an unknown lease; 3 = invalid argument; 14 = unavailable).
    #[error("etcd error {code}: {message}")]
    Status { code: i32, message: String },
    /// The watch's start revision is older than etcd's compaction point.
    #[error("watch start revision compacted (compacted up to {compact_revision})")]
    Compacted { compact_revision: i64 },
    #[error("cannot encode an etcd request: {0}")]
    Encode(#[source] serde_json::Error),
    /// An error answer that is not the gateway's JSON (a proxy's page, say).
    #[error("malformed etcd answer: HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("malformed etcd answer: {path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("malformed etcd answer: txn answered {answered} responses for {ops} ops")]
    TxnResponses { answered: usize, ops: usize },
    #[error("malformed etcd answer: empty {0}")]
    Empty(String),
    #[error("malformed etcd answer: unknown event type {0:?}")]
    UnknownEvent(String),
    #[error("malformed etcd answer: watch answer did not confirm creation")]
    WatchUnconfirmed,
    #[error("malformed etcd answer: watch: {0}")]
    WatchJson(#[source] serde_json::Error),
    #[error("malformed etcd answer: {what} is not base64: {source}")]
    Base64 {
        what: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("etcd answer larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    #[error("etcd watch stream ended")]
    WatchClosed,
    #[error("etcd watch sent nothing for {0:?}")]
    WatchIdle(Duration),
    /// etcd ended the watch for another reason than compaction (e.g. the member lost its
    /// leader).
    #[error("etcd canceled the watch: {0}")]
    WatchCanceled(String),
}

/// A handle on an etcd cluster; cheap to clone, shared by threads.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    agent: ureq::Agent,
    endpoints: Vec<String>,
    /// Index of the endpoint that answered last: calls start there.
    preferred: AtomicUsize,
    timeout: Duration,
}

/// One attempt on one endpoint: `Err` = it could not be reached (try the next one), `Ok` =
/// an answer (final, even when it is an error).
type Attempt<T> = Result<Result<T, EtcdError>, ureq::Error>;

impl Etcd {
    /// endpoints like "http://127.0.0.1:2379"; refuses anything but http:// URLs with a clear
    /// error (TLS is not built in). `timeout` bounds every unary call, fail-over included.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Etcd, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::BadEndpoint {
                endpoint: String::new(),
                reason: "no endpoints given",
            });
        }
        let endpoints = endpoints
            .iter()
            .map(|e| check_endpoint(e))
            .collect::<Result<Vec<_>, _>>()?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // etcd's error answers carry a JSON body we want to read.
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        Ok(Etcd {
            inner: Arc::new(Inner {
                agent,
                endpoints,
                preferred: AtomicUsize::new(0),
                timeout,
            }),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// Reads one key, linearizably (it sees every write acknowledged before the call).
    pub fn get(&self, key: &[u8]) -> Result<Option<Kv>, EtcdError> {
        let req = wire::RangeRequest {
            key: b64(key),
            range_end: None,
        };
        first_kv(self.call("/v3/kv/range", &req)?)
    }

    /// Every key under `prefix`, sorted by key, and the revision they were read at (a watch
    /// from that revision + 1 misses nothing).
    pub fn get_prefix(&self, prefix: &[u8]) -> Result<(Vec<Kv>, i64), EtcdError> {
        let (key, end) = prefix_range(prefix);
        let req = wire::RangeRequest {
            key: b64(&key),
            range_end: Some(b64(&end)),
        };
        all_kvs(self.call("/v3/kv/range", &req)?)
    }

    /// Sets `key`, attached to `lease` (0 = none); returns the revision of the write.
    pub fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<i64, EtcdError> {
        let resp: wire::HeaderOnly = self.call("/v3/kv/put", &put_request(key, value, lease))?;
        Ok(resp.header.revision)
    }

    /// Deletes `key` if present; returns the store's revision after the call.
    pub fn delete(&self, key: &[u8]) -> Result<i64, EtcdError> {
        let req = wire::DeleteRangeRequest {
            key: b64(key),
            range_end: None,
        };
        let resp: wire::HeaderOnly = self.call("/v3/kv/deleterange", &req)?;
        Ok(resp.header.revision)
    }

    /// Deletes every key under `prefix`; returns the store's revision after the call.
    pub fn delete_prefix(&self, prefix: &[u8]) -> Result<i64, EtcdError> {
        let (key, end) = prefix_range(prefix);
        let req = wire::DeleteRangeRequest {
            key: b64(&key),
            range_end: Some(b64(&end)),
        };
        let resp: wire::HeaderOnly = self.call("/v3/kv/deleterange", &req)?;
        Ok(resp.header.revision)
    }

    /// Runs a txn: the one way to decide something on shared state (compare, then write).
    pub fn txn(&self, txn: &Txn) -> Result<TxnResult, EtcdError> {
        let req = wire::TxnRequest {
            compare: txn.compare.iter().map(compare_request).collect(),
            success: txn.success.iter().map(request_op).collect(),
            failure: txn.failure.iter().map(request_op).collect(),
        };
        txn_result(self.call("/v3/kv/txn", &req)?, txn)
    }

    /// Grants a lease of `ttl_secs` (etcd may raise a TTL below its minimum, about 1.5
    /// election timeouts); keys put under it are deleted when it expires or is revoked.
    pub fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId, EtcdError> {
        let req = wire::LeaseGrantRequest { ttl: ttl_secs };
        lease_granted(self.call("/v3/lease/grant", &req)?)
    }

    /// Renews once; Ok(remaining ttl secs), Ok(0) or an error when the lease is gone.
    /// (etcd 3.4 answers a gone lease with a message without TTL, so Ok(0) is what it gives.)
    pub fn lease_keepalive(&self, id: LeaseId) -> Result<i64, EtcdError> {
        let req = wire::LeaseIdRequest { id };
        // A streaming call: the gateway answers one message per request message, and ends the
        // stream at the end of our (single-message) request body.
        let msg: wire::StreamMessage<wire::LeaseKeepAliveResponse> =
            self.call("/v3/lease/keepalive", &req)?;
        stream_result(msg, "keep-alive answer").map(|r| r.ttl)
    }

    /// Revokes a lease, deleting its keys. A lease already gone gives `Status` code 5.
    pub fn lease_revoke(&self, id: LeaseId) -> Result<(), EtcdError> {
        let _: wire::HeaderOnly = self.call("/v3/lease/revoke", &wire::LeaseIdRequest { id })?;
        Ok(())
    }

    /// A watch of every key under `prefix` from `start_revision` (inclusive; 0 = from now).
    /// `idle` bounds how long next() waits for bytes (None = forever); etcd sends nothing while
    /// nothing changes, so an idle error on a quiet prefix is normal: watch again from the last
    /// revision + 1. A compacted start revision shows as `Compacted` from the first `next()`.
    /// A member that loses its leader ends the watch after about three election timeouts with
    /// `Status` code 14 ("etcdserver: no leader") rather than leave it silently stale.
    pub fn watch(
        &self,
        prefix: &[u8],
        start_revision: i64,
        idle: Option<Duration>,
    ) -> Result<Watch, EtcdError> {
        let (key, end) = prefix_range(prefix);
        let req = wire::WatchRequest {
            create_request: wire::WatchCreateRequest {
                key: b64(&key),
                range_end: b64(&end),
                start_revision,
            },
        };
        let body = encode(&req)?;
        let (endpoint, reader) = self.each_endpoint(|endpoint, budget| {
            let resp = self
                .inner
                .agent
                .post(format!("{endpoint}/v3/watch"))
                .config()
                .timeout_connect(Some(budget.min(CONNECT_TIMEOUT_MAX)))
                .timeout_recv_response(Some(budget))
                .timeout_per_read(idle)
                .build()
                .header("content-type", "application/json")
                // The member cancels the watch when it loses its leader instead of going
                // quiet (etcd's require-leader metadata; the gateway passes Grpc-Metadata-*).
                .header("grpc-metadata-hasleader", "true")
                .send(&body[..])?;
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                let bytes = read_bounded(resp.into_body())?;
                return Ok(bytes.and_then(|b| Err(error_answer(status, &b))));
            }
            Ok(Ok((endpoint.to_string(), resp.into_body().into_reader())))
        })?;
        Watch::open(endpoint, Box::new(reader), idle)
    }

    /// A unary call: JSON in, JSON out, with fail-over.
    fn call<Q: Serialize, R: DeserializeOwned>(&self, path: &str, req: &Q) -> Result<R, EtcdError> {
        let body = encode(req)?;
        let bytes =
            self.each_endpoint(|endpoint, budget| self.post(endpoint, path, &body, budget))?;
        parse(path, &bytes)
    }

    fn post(&self, endpoint: &str, path: &str, body: &[u8], budget: Duration) -> Attempt<Vec<u8>> {
        let resp = self
            .inner
            .agent
            .post(format!("{endpoint}{path}"))
            .config()
            .timeout_global(Some(budget))
            .timeout_connect(Some(budget.min(CONNECT_TIMEOUT_MAX)))
            .build()
            .header("content-type", "application/json")
            .send(body)?;
        let status = resp.status().as_u16();
        let bytes = read_bounded(resp.into_body())?;
        Ok(bytes.and_then(|b| match status {
            200 => Ok(b),
            _ => Err(error_answer(status, &b)),
        }))
    }

    /// Runs `attempt` on each endpoint in turn, from the one that answered last, until one
    /// answers or the call's timeout has passed.
    fn each_endpoint<T>(
        &self,
        mut attempt: impl FnMut(&str, Duration) -> Attempt<T>,
    ) -> Result<T, EtcdError> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.timeout;
        let n = inner.endpoints.len();
        let first = inner.preferred.load(Ordering::Relaxed);
        let mut last: Option<(usize, ureq::Error)> = None;
        for k in 0..n {
            let i = (first + k) % n;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let budget = attempt_budget(remaining, k + 1 == n);
            match attempt(&inner.endpoints[i], budget) {
                Ok(answer) => {
                    inner.preferred.store(i, Ordering::Relaxed);
                    return answer;
                }
                Err(e) => {
                    log::debug!("etcd {}: {e}", inner.endpoints[i]);
                    // The next call starts at the next endpoint.
                    inner.preferred.store((i + 1) % n, Ordering::Relaxed);
                    last = Some((i, e));
                }
            }
        }
        let (i, source): (usize, Box<dyn std::error::Error + Send + Sync>) = match last {
            Some((i, e)) => (i, Box::new(e)),
            None => (
                first % n,
                Box::new(io::Error::from(io::ErrorKind::TimedOut)),
            ),
        };
        Err(EtcdError::Unreachable {
            endpoint: inner.endpoints[i].clone(),
            source,
        })
    }
}

/// How much of a call's remaining time one endpoint gets: half while others are left to try,
/// so that a member that holds a request without answering does not use up the whole call.
/// (etcd 3.4 drops a proposal that reaches a member during an election and lets the request
/// wait for its own timeout, over 5 s; by the second attempt a new leader is usually in place.)
/// The last endpoint gets all that is left; no attempt gets less than [`MIN_ATTEMPT`].
fn attempt_budget(remaining: Duration, last: bool) -> Duration {
    if last {
        return remaining;
    }
    (remaining / 2).max(MIN_ATTEMPT).min(remaining)
}

/// Accepts "http://host:port" (a trailing '/' is dropped); nothing else.
fn check_endpoint(endpoint: &str) -> Result<String, EtcdError> {
    let bad = |reason| EtcdError::BadEndpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    let Some(authority) = endpoint.strip_prefix("http://") else {
        return Err(bad("only http:// URLs are supported (no TLS)"));
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if authority.contains(['/', '?', '#', '@']) {
        return Err(bad("expected http://host:port without a path"));
    }
    Ok(format!("http://{authority}"))
}

fn encode<Q: Serialize>(req: &Q) -> Result<Vec<u8>, EtcdError> {
    serde_json::to_vec(req).map_err(EtcdError::Encode)
}

/// Reads a whole answer, refusing one past [`MAX_ANSWER_BYTES`]. A broken connection is an
/// `Err` (try elsewhere); a too-big answer is a final one.
fn read_bounded(mut body: ureq::Body) -> Result<Result<Vec<u8>, EtcdError>, ureq::Error> {
    match body.with_config().limit(MAX_ANSWER_BYTES).read_to_vec() {
        Ok(bytes) => Ok(Ok(bytes)),
        Err(ureq::Error::BodyExceedsLimit(_)) => Ok(Err(EtcdError::TooLarge)),
        Err(e) => Err(e),
    }
}

/// An error answer: the gateway's `{"error","message","code"}`, else the HTTP status.
fn error_answer(status: u16, body: &[u8]) -> EtcdError {
    match serde_json::from_slice::<wire::ErrorAnswer>(body) {
        Ok(e) if !e.message.is_empty() || !e.error.is_empty() => EtcdError::Status {
            code: e.code,
            message: if e.message.is_empty() {
                e.error
            } else {
                e.message
            },
        },
        _ => EtcdError::Http {
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        },
    }
}

/// The range `[key, range_end)` that holds every key starting with `prefix`: range_end is the
/// prefix with its last byte below 0xff incremented and what follows dropped; a prefix of only
/// 0xff bytes has no such end, and "\0" stands for "to the end of the key space" (etcd's rule).
/// The empty prefix is every key: key "\0", range_end "\0".
pub fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    (prefix.to_vec(), prefix_range_end(prefix))
}

fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    }
}

fn put_request(key: &[u8], value: &[u8], lease: LeaseId) -> wire::PutRequest {
    wire::PutRequest {
        key: b64(key),
        value: b64(value),
        lease,
    }
}

fn compare_request(c: &Compare) -> wire::CompareRequest {
    use wire::CompareOperand as O;
    let (key, target, cmp, operand) = match c {
        Compare::Version(k, cmp, v) => (k, "VERSION", cmp, O::Version(*v)),
        Compare::CreateRevision(k, cmp, v) => (k, "CREATE", cmp, O::CreateRevision(*v)),
        Compare::ModRevision(k, cmp, v) => (k, "MOD", cmp, O::ModRevision(*v)),
        Compare::Value(k, cmp, v) => (k, "VALUE", cmp, O::Value(b64(v))),
        Compare::Lease(k, cmp, v) => (k, "LEASE", cmp, O::Lease(*v)),
    };
    let result = match cmp {
        Cmp::Equal => "EQUAL",
        Cmp::NotEqual => "NOT_EQUAL",
        Cmp::Less => "LESS",
        Cmp::Greater => "GREATER",
    };
    wire::CompareRequest {
        key: b64(key),
        target,
        result,
        operand,
    }
}

fn request_op(op: &Op) -> wire::RequestOp {
    use wire::RequestOp as R;
    let range = |prefix: &[u8]| {
        let (key, end) = prefix_range(prefix);
        (b64(&key), Some(b64(&end)))
    };
    match op {
        Op::Put { key, value, lease } => R::Put(put_request(key, value, *lease)),
        Op::Delete(key) => R::DeleteRange(wire::DeleteRangeRequest {
            key: b64(key),
            range_end: None,
        }),
        Op::DeletePrefix(prefix) => {
            let (key, range_end) = range(prefix);
            R::DeleteRange(wire::DeleteRangeRequest { key, range_end })
        }
        Op::Get(key) => R::Range(wire::RangeRequest {
            key: b64(key),
            range_end: None,
        }),
        Op::GetPrefix(prefix) => {
            let (key, range_end) = range(prefix);
            R::Range(wire::RangeRequest { key, range_end })
        }
    }
}

fn decode_kv(raw: wire::RawKv) -> Result<Kv, EtcdError> {
    Ok(Kv {
        key: unb64(&raw.key, "key")?,
        value: unb64(&raw.value, "value")?,
        create_revision: raw.create_revision,
        mod_revision: raw.mod_revision,
        version: raw.version,
        lease: raw.lease,
    })
}

fn decode_kvs(raw: Vec<wire::RawKv>) -> Result<Vec<Kv>, EtcdError> {
    raw.into_iter().map(decode_kv).collect()
}

/// A successful (HTTP 200) answer of `path` as JSON.
fn parse<R: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<R, EtcdError> {
    serde_json::from_slice(bytes).map_err(|source| EtcdError::Json {
        path: path.to_string(),
        source,
    })
}

/// A single-key range's answer: its kv, if any.
fn first_kv(resp: wire::RangeResponse) -> Result<Option<Kv>, EtcdError> {
    resp.kvs.into_iter().next().map(decode_kv).transpose()
}

/// A prefix range's answer: every kv, and the revision they were read at.
fn all_kvs(resp: wire::RangeResponse) -> Result<(Vec<Kv>, i64), EtcdError> {
    let kvs = decode_kvs(resp.kvs)?;
    Ok((kvs, resp.header.revision))
}

/// A txn's answer, checked against the branch it reports taken: one response per op.
fn txn_result(resp: wire::TxnResponse, txn: &Txn) -> Result<TxnResult, EtcdError> {
    let branch = if resp.succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    if resp.responses.len() != branch.len() {
        return Err(EtcdError::TxnResponses {
            answered: resp.responses.len(),
            ops: branch.len(),
        });
    }
    let responses = resp
        .responses
        .into_iter()
        .map(|r| decode_kvs(r.response_range.map(|r| r.kvs).unwrap_or_default()))
        .collect::<Result<_, _>>()?;
    Ok(TxnResult {
        succeeded: resp.succeeded,
        revision: resp.header.revision,
        responses,
    })
}

fn lease_granted(resp: wire::LeaseGrantResponse) -> Result<LeaseId, EtcdError> {
    if !resp.error.is_empty() {
        return Err(EtcdError::Status {
            code: 0,
            message: resp.error,
        });
    }
    Ok(resp.id)
}

/// One message of a streaming call: its result, or the stream's error. `what` names the
/// message in the error when it has neither.
fn stream_result<T>(msg: wire::StreamMessage<T>, what: &str) -> Result<T, EtcdError> {
    match (msg.result, msg.error) {
        (_, Some(e)) => Err(EtcdError::Status {
            code: e.grpc_code,
            message: e.message,
        }),
        (Some(r), None) => Ok(r),
        (None, None) => Err(EtcdError::Empty(what.to_string())),
    }
}

fn decode_event(raw: wire::RawEvent) -> Result<Event, EtcdError> {
    let kind = match raw.kind.as_str() {
        "" | "PUT" => EventKind::Put,
        "DELETE" => EventKind::Delete,
        other => return Err(EtcdError::UnknownEvent(other.to_string())),
    };
    Ok(Event {
        kind,
        kv: decode_kv(raw.kv)?,
    })
}

/// Counts the bytes read since the last message, so no one watch message can grow past
/// [`MAX_ANSWER_BYTES`] (the stream as a whole is unbounded).
struct Counted<R> {
    inner: R,
    since_message: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.since_message.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total > MAX_ANSWER_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, TooLargeMessage));
        }
        Ok(n)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("watch message larger than {MAX_ANSWER_BYTES} bytes")]
struct TooLargeMessage;

/// The body of a watch call: a `ureq::BodyReader`, or bytes when fuzzing.
type WatchBody = Box<dyn Read + Send>;

type WatchStream = serde_json::StreamDeserializer<
    'static,
    serde_json::de::IoRead<BufReader<Counted<WatchBody>>>,
    wire::StreamMessage<wire::WatchResponse>,
>;

/// An open watch: a stream of JSON messages from one member. Dropping it closes the
/// connection, which ends the watch on the member.
pub struct Watch {
    endpoint: String,
    idle: Option<Duration>,
    since_message: Arc<AtomicU64>,
    stream: WatchStream,
    closed: bool,
}

impl Watch {
    /// A watch on the answer `reader` of a watch call; reads the creation message.
    fn open(
        endpoint: String,
        reader: WatchBody,
        idle: Option<Duration>,
    ) -> Result<Watch, EtcdError> {
        let mut watch = Watch::new(endpoint, reader, idle);
        watch.expect_created()?;
        Ok(watch)
    }

    fn new(endpoint: String, reader: WatchBody, idle: Option<Duration>) -> Watch {
        let since_message = Arc::new(AtomicU64::new(0));
        let counted = Counted {
            inner: reader,
            since_message: since_message.clone(),
        };
        let stream = serde_json::Deserializer::from_reader(BufReader::new(counted)).into_iter();
        Watch {
            endpoint,
            idle,
            since_message,
            stream,
            closed: false,
        }
    }

    /// Reads the first message, which confirms the watch was created.
    fn expect_created(&mut self) -> Result<(), EtcdError> {
        let first = self.read_message()?;
        if first.created {
            return Ok(());
        }
        self.closed = true;
        match check_canceled(&first) {
            Err(e) => Err(e),
            Ok(()) => Err(EtcdError::WatchUnconfirmed),
        }
    }

    /// Blocks for the next batch of events (one etcd revision's worth or more) and returns
    /// them with the revision they bring the watcher up to. Err on stream end, idle timeout,
    /// compaction; after an Err the watch is finished (every later call gives WatchClosed).
    // Not an Iterator: a watch never ends with None, every end is an error saying why.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<(Vec<Event>, i64), EtcdError> {
        loop {
            let msg = self.read_message()?;
            if let Err(e) = check_canceled(&msg) {
                self.closed = true;
                return Err(e);
            }
            // Messages without events (creation, progress) carry nothing for the caller.
            if msg.events.is_empty() {
                continue;
            }
            let events = msg.events.into_iter().map(decode_event).collect();
            return match events {
                Ok(events) => Ok((events, msg.header.revision)),
                Err(e) => {
                    self.closed = true;
                    Err(e)
                }
            };
        }
    }

    fn read_message(&mut self) -> Result<wire::WatchResponse, EtcdError> {
        if self.closed {
            return Err(EtcdError::WatchClosed);
        }
        self.since_message.store(0, Ordering::Relaxed);
        let item = self.stream.next();
        let result = match item {
            None => Err(EtcdError::WatchClosed),
            Some(Err(e)) => Err(self.stream_error(e)),
            Some(Ok(msg)) => stream_result(msg, "watch message"),
        };
        if result.is_err() {
            self.closed = true;
        }
        result
    }

    fn stream_error(&self, e: serde_json::Error) -> EtcdError {
        if e.is_eof() {
            return EtcdError::WatchClosed;
        }
        if !e.is_io() {
            return EtcdError::WatchJson(e);
        }
        let io: io::Error = e.into();
        let cause = io.get_ref();
        if cause.is_some_and(|c| c.is::<TooLargeMessage>()) {
            return EtcdError::TooLarge;
        }
        if let (Some(idle), Some(ureq::Error::Timeout(_))) = (
            self.idle,
            cause.and_then(|c| c.downcast_ref::<ureq::Error>()),
        ) {
            return EtcdError::WatchIdle(idle);
        }
        EtcdError::Unreachable {
            endpoint: self.endpoint.clone(),
            source: Box::new(io),
        }
    }
}

/// A `canceled` message ends the watch: compaction when it names a compact revision.
fn check_canceled(msg: &wire::WatchResponse) -> Result<(), EtcdError> {
    if msg.compact_revision != 0 {
        return Err(EtcdError::Compacted {
            compact_revision: msg.compact_revision,
        });
    }
    if msg.canceled {
        return Err(EtcdError::WatchCanceled(msg.cancel_reason.clone()));
    }
    Ok(())
}

/// The answer decoders the client runs on what etcd sends, from raw bytes, for the fuzz
/// targets (`fuzz/fuzz_targets/etcd_wire.rs`). Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// `/v3/kv/range` for one key ([`Etcd::get`]).
    pub fn get(answer: &[u8]) -> Result<Option<Kv>, EtcdError> {
        first_kv(parse("/v3/kv/range", answer)?)
    }

    /// `/v3/kv/range` for a prefix ([`Etcd::get_prefix`]).
    pub fn get_prefix(answer: &[u8]) -> Result<(Vec<Kv>, i64), EtcdError> {
        all_kvs(parse("/v3/kv/range", answer)?)
    }

    /// `/v3/kv/put`, `/v3/kv/deleterange` and `/v3/lease/revoke`: the revision.
    pub fn header_only(answer: &[u8]) -> Result<i64, EtcdError> {
        let resp: wire::HeaderOnly = parse("/v3/kv/put", answer)?;
        Ok(resp.header.revision)
    }

    /// `/v3/kv/txn`, as an answer to `txn` ([`Etcd::txn`]).
    pub fn txn(answer: &[u8], txn: &Txn) -> Result<TxnResult, EtcdError> {
        txn_result(parse("/v3/kv/txn", answer)?, txn)
    }

    /// `/v3/lease/grant` ([`Etcd::lease_grant`]).
    pub fn lease_grant(answer: &[u8]) -> Result<LeaseId, EtcdError> {
        lease_granted(parse("/v3/lease/grant", answer)?)
    }

    /// `/v3/lease/keepalive` ([`Etcd::lease_keepalive`]).
    pub fn lease_keepalive(answer: &[u8]) -> Result<i64, EtcdError> {
        let msg: wire::StreamMessage<wire::LeaseKeepAliveResponse> =
            parse("/v3/lease/keepalive", answer)?;
        stream_result(msg, "keep-alive answer").map(|r| r.ttl)
    }

    /// Any call's answer with an HTTP status other than 200.
    pub fn error(status: u16, answer: &[u8]) -> EtcdError {
        error_answer(status, answer)
    }

    /// A `/v3/watch` stream: the watch once its creation message is read ([`Etcd::watch`]);
    /// [`Watch::next`] reads the rest.
    pub fn watch(stream: impl Read + Send + 'static) -> Result<Watch, EtcdError> {
        Watch::open("fuzz".into(), Box::new(stream), None)
    }
}

#[cfg(test)]
mod tests;
