//! The pure parts: prefix ranges, request shapes and decoding answers recorded from etcd 3.4.23
//! through curl (so the zero-value omissions are the real ones).

use super::*;

#[test]
fn prefix_range_end_increments_the_last_byte() {
    assert_eq!(prefix_range(b"a/"), (b"a/".to_vec(), b"a0".to_vec()));
    assert_eq!(prefix_range(b"ab"), (b"ab".to_vec(), b"ac".to_vec()));
}

#[test]
fn prefix_range_end_drops_trailing_ff() {
    assert_eq!(prefix_range_end(&[b'a', 0xff]), b"b".to_vec());
    assert_eq!(prefix_range_end(&[1, 0xfe, 0xff, 0xff]), vec![1, 0xff]);
}

#[test]
fn prefix_range_of_all_ff_or_nothing_runs_to_the_end() {
    assert_eq!(prefix_range(&[0xff, 0xff]), (vec![0xff, 0xff], vec![0]));
    assert_eq!(prefix_range(b""), (vec![0], vec![0]));
}

#[test]
fn endpoints_must_be_plain_http() {
    let ok = |e: &str| check_endpoint(e).unwrap();
    assert_eq!(ok("http://127.0.0.1:2379"), "http://127.0.0.1:2379");
    assert_eq!(ok("http://etcd1:2379/"), "http://etcd1:2379");
    for bad in [
        "https://127.0.0.1:2379",
        "127.0.0.1:2379",
        "http://",
        "http://h:1/v3",
    ] {
        assert!(
            matches!(check_endpoint(bad), Err(EtcdError::BadEndpoint { .. })),
            "{bad}"
        );
    }
    assert!(Etcd::new(&[], Duration::from_secs(1)).is_err());
}

#[test]
fn etcd_is_send_sync_clone_and_watch_is_send() {
    fn check<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    check::<Etcd>();
    send::<Watch>();
}

#[test]
fn txn_request_shape() {
    let txn = Txn {
        compare: vec![
            Compare::Version(b"k".to_vec(), Cmp::Equal, 0),
            Compare::Value(b"k".to_vec(), Cmp::NotEqual, b"v".to_vec()),
            Compare::Lease(b"k".to_vec(), Cmp::Greater, 7),
        ],
        success: vec![
            Op::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                lease: 0,
            },
            Op::GetPrefix(b"p/".to_vec()),
        ],
        failure: vec![Op::Delete(b"k".to_vec())],
    };
    let req = wire::TxnRequest {
        compare: txn.compare.iter().map(compare_request).collect(),
        success: txn.success.iter().map(request_op).collect(),
        failure: txn.failure.iter().map(request_op).collect(),
    };
    let json = serde_json::to_value(&req).unwrap();
    let expected = serde_json::json!({
        "compare": [
            {"key": "aw==", "target": "VERSION", "result": "EQUAL", "version": "0"},
            {"key": "aw==", "target": "VALUE", "result": "NOT_EQUAL", "value": "dg=="},
            {"key": "aw==", "target": "LEASE", "result": "GREATER", "lease": "7"},
        ],
        "success": [
            {"request_put": {"key": "aw==", "value": "dg==", "lease": "0"}},
            {"request_range": {"key": "cC8=", "range_end": "cDA="}},
        ],
        "failure": [{"request_delete_range": {"key": "aw=="}}],
    });
    assert_eq!(json, expected);
}

#[test]
fn range_answer_with_missing_value_and_lease() {
    let answer = r#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"3","raft_term":"2"},"kvs":[{"key":"YS8x","create_revision":"2","mod_revision":"2","version":"1","value":"djE="},{"key":"YS8y","create_revision":"3","mod_revision":"3","version":"1"}],"count":"2"}"#;
    let resp: wire::RangeResponse = serde_json::from_str(answer).unwrap();
    assert_eq!(resp.header.revision, 3);
    let kvs = decode_kvs(resp.kvs).unwrap();
    assert_eq!(
        kvs[0],
        Kv {
            key: b"a/1".to_vec(),
            value: b"v1".to_vec(),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            lease: 0,
        }
    );
    assert_eq!(
        (kvs[1].key.as_slice(), kvs[1].value.len()),
        (&b"a/2"[..], 0)
    );
}

#[test]
fn range_answer_without_kvs() {
    let answer = r#"{"header":{"cluster_id":"1","member_id":"2","revision":"1","raft_term":"2"}}"#;
    let resp: wire::RangeResponse = serde_json::from_str(answer).unwrap();
    assert!(resp.kvs.is_empty());
    assert_eq!(resp.header.revision, 1);
}

#[test]
fn kv_with_lease_and_numeric_int64() {
    let kv = r#"{"key":"bC8x","create_revision":5,"mod_revision":"5","version":"1","value":"eA==","lease":"2324035713728196111"}"#;
    let kv = decode_kv(serde_json::from_str(kv).unwrap()).unwrap();
    assert_eq!((kv.create_revision, kv.lease), (5, 2324035713728196111));
}

#[test]
fn txn_answers() {
    let ok = r#"{"header":{"revision":"9"},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"9"}}},{"response_range":{"header":{"revision":"9"},"kvs":[{"key":"dC8x","create_revision":"9","mod_revision":"9","version":"1","value":"b25l"}],"count":"1"}}]}"#;
    let resp: wire::TxnResponse = serde_json::from_str(ok).unwrap();
    assert!(resp.succeeded);
    assert!(resp.responses[0].response_put.is_some());
    assert_eq!(
        resp.responses[1].response_range.as_ref().unwrap().kvs.len(),
        1
    );
    // A failed compare with an empty branch: no "succeeded", no "responses".
    let failed = r#"{"header":{"cluster_id":"1","member_id":"2","revision":"9","raft_term":"2"}}"#;
    let resp: wire::TxnResponse = serde_json::from_str(failed).unwrap();
    assert!(!resp.succeeded && resp.responses.is_empty());
}

#[test]
fn lease_answers() {
    let grant = r#"{"header":{"revision":"4"},"ID":"2324035713728196109","TTL":"5"}"#;
    let resp: wire::LeaseGrantResponse = serde_json::from_str(grant).unwrap();
    assert_eq!((resp.id, resp.ttl), (2324035713728196109, 5));
    // Keep-alive of a live lease, then of a gone one (no TTL), as the stream wraps them.
    let alive = "{\"result\":{\"header\":{\"revision\":\"5\"},\"ID\":\"23\",\"TTL\":\"5\"}}\n";
    let msg: wire::StreamMessage<wire::LeaseKeepAliveResponse> =
        serde_json::from_str(alive).unwrap();
    assert_eq!(msg.result.unwrap().ttl, 5);
    let gone = "{\"result\":{\"header\":{\"revision\":\"6\"},\"ID\":\"23\"}}\n";
    let msg: wire::StreamMessage<wire::LeaseKeepAliveResponse> =
        serde_json::from_str(gone).unwrap();
    assert_eq!(msg.result.unwrap().ttl, 0);
}

#[test]
fn error_answers() {
    let body = br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
    match error_answer(404, body) {
        EtcdError::Status { code, message } => {
            assert_eq!(code, 5);
            assert_eq!(message, "etcdserver: requested lease not found");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        error_answer(502, b"Bad Gateway"),
        EtcdError::Http { status: 502, .. }
    ));
}

/// A recorded watch stream: creation, a put, an empty-valued put, a txn of two puts, then a
/// prefix delete (events of type DELETE with only key and mod_revision).
const WATCH_STREAM: &str = r#"{"result":{"header":{"cluster_id":"3","member_id":"4","revision":"9","raft_term":"2"},"created":true}}
{"result":{"header":{"revision":"10"},"events":[{"kv":{"key":"dy9h","create_revision":"10","mod_revision":"10","version":"1","value":"MQ=="}}]}}
{"result":{"header":{"revision":"11"},"events":[{"kv":{"key":"dy9i","create_revision":"11","mod_revision":"11","version":"1"}}]}}
{"result":{"header":{"revision":"12"},"events":[{"kv":{"key":"dy9j","create_revision":"12","mod_revision":"12","version":"1","value":"Mw=="}},{"kv":{"key":"dy9k","create_revision":"12","mod_revision":"12","version":"1","value":"NA=="}}]}}
{"result":{"header":{"revision":"13"},"events":[{"type":"DELETE","kv":{"key":"dy9h","mod_revision":"13"}},{"type":"DELETE","kv":{"key":"dy9i","mod_revision":"13"}}]}}
"#;

fn messages(text: &str) -> Vec<wire::WatchResponse> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<wire::StreamMessage<wire::WatchResponse>>()
        .map(|m| m.unwrap().result.unwrap())
        .collect()
}

#[test]
fn watch_stream_decodes() {
    let msgs = messages(WATCH_STREAM);
    assert_eq!(msgs.len(), 5);
    assert!(msgs[0].created && msgs[0].events.is_empty());
    let put = decode_event(msgs[1].events[0].clone()).unwrap();
    assert_eq!(put.kind, EventKind::Put);
    assert_eq!(
        (put.kv.key.as_slice(), put.kv.value.as_slice()),
        (&b"w/a"[..], &b"1"[..])
    );
    assert_eq!(msgs[3].events.len(), 2);
    assert_eq!(msgs[3].header.revision, 12);
    let del = decode_event(msgs[4].events[0].clone()).unwrap();
    assert_eq!(del.kind, EventKind::Delete);
    assert_eq!(
        (del.kv.key.as_slice(), del.kv.mod_revision),
        (&b"w/a"[..], 13)
    );
    assert_eq!((del.kv.version, del.kv.create_revision), (0, 0));
    for m in &msgs {
        check_canceled(m).unwrap();
    }
}

#[test]
fn watch_compaction_cancel() {
    // After the creation message; the header has no revision.
    let text = r#"{"result":{"header":{"cluster_id":"3","member_id":"4","raft_term":"2"},"canceled":true,"compact_revision":"12"}}"#;
    let msg = &messages(text)[0];
    assert!(matches!(
        check_canceled(msg),
        Err(EtcdError::Compacted {
            compact_revision: 12
        })
    ));
    let other = r#"{"result":{"header":{},"canceled":true,"cancel_reason":"no leader"}}"#;
    assert!(matches!(
        check_canceled(&messages(other)[0]),
        Err(EtcdError::WatchCanceled(r)) if r == "no leader"
    ));
}

#[test]
fn watch_stream_error_message() {
    let text = r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#;
    let msg: wire::StreamMessage<wire::WatchResponse> = serde_json::from_str(text).unwrap();
    let e = msg.error.unwrap();
    assert_eq!(
        (e.grpc_code, e.message.as_str()),
        (14, "etcdserver: no leader")
    );
}

#[test]
fn unknown_event_type_is_a_decode_error() {
    let raw = wire::RawEvent {
        kind: "MOVE".into(),
        kv: wire::RawKv::default(),
    };
    assert!(matches!(decode_event(raw), Err(EtcdError::UnknownEvent(kind)) if kind == "MOVE"));
}

#[test]
fn attempt_budget_leaves_time_for_the_others() {
    let s = Duration::from_secs;
    assert_eq!(attempt_budget(s(2), false), s(1));
    assert_eq!(attempt_budget(s(2), true), s(2));
    assert_eq!(
        attempt_budget(Duration::from_millis(300), false),
        MIN_ATTEMPT
    );
    let tiny = Duration::from_millis(100);
    assert_eq!(attempt_budget(tiny, false), tiny);
}
