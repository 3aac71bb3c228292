//! The JSON shapes of etcd 3.4's v3 gRPC gateway (`/v3/...`), as its grpc-gateway writes them:
//! proto3 JSON with the proto field names. What the gateway really sends (checked with curl
//! against etcd 3.4.23) and every type below follows:
//!
//! - `bytes` fields (keys, values) are standard base64; an empty value is left out entirely.
//! - `int64` fields are JSON strings (`"revision":"12"`); they are accepted as numbers too.
//! - every field at its zero value is left out: `kvs`/`events`/`responses` when empty,
//!   `succeeded` when false, a kv's `value`/`lease`, an event's `type` for PUT (enum value 0),
//!   a keep-alive's `TTL` once the lease is gone, a compaction cancel's header `revision`.
//!   So every response type is `#[serde(default)]`.
//! - streaming calls (`/v3/watch`, `/v3/lease/keepalive`) wrap each message as `{"result":..}`,
//!   or `{"error":{..}}` for a stream error; unary errors are `{"error","message","code"}` with
//!   an HTTP status mapped from the gRPC code.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Encodes bytes as the gateway wants them.
pub(super) fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes a base64 field; `what` names it in the error.
pub(super) fn unb64(text: &str, what: &'static str) -> Result<Vec<u8>, super::EtcdError> {
    STANDARD
        .decode(text)
        .map_err(|source| super::EtcdError::Base64 { what, source })
}

/// int64 as proto3 JSON writes it: a string (a JSON number would lose precision past 2^53 in
/// other readers; lease ids are that large).
fn ser_i64<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// int64 from a JSON string (what the gateway sends) or a number (what it also accepts).
fn de_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StrOrNum {
        Str(String),
        Num(i64),
    }
    match StrOrNum::deserialize(d)? {
        StrOrNum::Str(s) => s
            .parse()
            .map_err(|e| D::Error::custom(format!("int64 {s:?}: {e}"))),
        StrOrNum::Num(n) => Ok(n),
    }
}

// ---- requests ----

#[derive(Debug, Serialize)]
pub(super) struct RangeRequest {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range_end: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct PutRequest {
    pub key: String,
    pub value: String,
    #[serde(serialize_with = "ser_i64")]
    pub lease: i64,
}

#[derive(Debug, Serialize)]
pub(super) struct DeleteRangeRequest {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range_end: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct TxnRequest {
    pub compare: Vec<CompareRequest>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

/// One comparison: `target` is VERSION, CREATE, MOD, VALUE or LEASE; `result` EQUAL, GREATER,
/// LESS or NOT_EQUAL; the operand sits in the field named after the target.
#[derive(Debug, Serialize)]
pub(super) struct CompareRequest {
    pub key: String,
    pub target: &'static str,
    pub result: &'static str,
    #[serde(flatten)]
    pub operand: CompareOperand,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum CompareOperand {
    Version(#[serde(serialize_with = "ser_i64")] i64),
    CreateRevision(#[serde(serialize_with = "ser_i64")] i64),
    ModRevision(#[serde(serialize_with = "ser_i64")] i64),
    Value(String),
    Lease(#[serde(serialize_with = "ser_i64")] i64),
}

#[derive(Debug, Serialize)]
pub(super) enum RequestOp {
    #[serde(rename = "request_range")]
    Range(RangeRequest),
    #[serde(rename = "request_put")]
    Put(PutRequest),
    #[serde(rename = "request_delete_range")]
    DeleteRange(DeleteRangeRequest),
}

#[derive(Debug, Serialize)]
pub(super) struct LeaseGrantRequest {
    #[serde(rename = "TTL", serialize_with = "ser_i64")]
    pub ttl: i64,
}

/// Keep-alive and revoke both name the lease only.
#[derive(Debug, Serialize)]
pub(super) struct LeaseIdRequest {
    #[serde(rename = "ID", serialize_with = "ser_i64")]
    pub id: i64,
}

#[derive(Debug, Serialize)]
pub(super) struct WatchRequest {
    pub create_request: WatchCreateRequest,
}

#[derive(Debug, Serialize)]
pub(super) struct WatchCreateRequest {
    pub key: String,
    pub range_end: String,
    #[serde(serialize_with = "ser_i64")]
    pub start_revision: i64,
}

// ---- responses ----

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ResponseHeader {
    #[serde(deserialize_with = "de_i64")]
    pub revision: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawKv {
    pub key: String,
    pub value: String,
    #[serde(deserialize_with = "de_i64")]
    pub create_revision: i64,
    #[serde(deserialize_with = "de_i64")]
    pub mod_revision: i64,
    #[serde(deserialize_with = "de_i64")]
    pub version: i64,
    #[serde(deserialize_with = "de_i64")]
    pub lease: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RangeResponse {
    pub header: ResponseHeader,
    pub kvs: Vec<RawKv>,
}

/// Put and delete-range answers: only the revision matters here.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct HeaderOnly {
    pub header: ResponseHeader,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct TxnResponse {
    pub header: ResponseHeader,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

/// One op's answer: exactly one of these is set (a nested txn's `response_txn` is not used).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ResponseOp {
    pub response_range: Option<RangeResponse>,
    pub response_put: Option<HeaderOnly>,
    pub response_delete_range: Option<HeaderOnly>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct LeaseGrantResponse {
    #[serde(rename = "ID", deserialize_with = "de_i64")]
    pub id: i64,
    #[serde(rename = "TTL", deserialize_with = "de_i64")]
    pub ttl: i64,
    pub error: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct LeaseKeepAliveResponse {
    #[serde(rename = "TTL", deserialize_with = "de_i64")]
    pub ttl: i64,
}

/// One message of a streaming call.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct StreamMessage<T> {
    pub result: Option<T>,
    pub error: Option<StreamError>,
}

/// A streaming call's error message (grpc-gateway v1 `StreamError`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct StreamError {
    pub grpc_code: i32,
    pub message: String,
}

/// A unary call's error answer (any HTTP status but 200).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ErrorAnswer {
    pub code: i32,
    pub message: String,
    pub error: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct WatchResponse {
    pub header: ResponseHeader,
    pub created: bool,
    pub canceled: bool,
    #[serde(deserialize_with = "de_i64")]
    pub compact_revision: i64,
    pub cancel_reason: String,
    pub events: Vec<RawEvent>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawEvent {
    /// "DELETE", or absent ("" here) for PUT, the enum's zero value.
    #[serde(rename = "type")]
    pub kind: String,
    pub kv: RawKv,
}
