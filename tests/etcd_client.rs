//! meta::etcd against real 3-member etcd 3.4 clusters (one per test, in parallel): key-value
//! calls, txns, leases, watches with compaction, and fail-over when members die.

mod common;

use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::{tools_available, wait_until, TestDir};
use cormorant::meta::etcd::{
    Cmp, Compare, Etcd, EtcdError, EventKind, Kv, LeaseId, Op, Txn, TxnResult,
};

/// Every unary call's bound: long enough for an election (~0.5 s here), short enough that a
/// cluster without quorum fails a call quickly.
const TIMEOUT: Duration = Duration::from_secs(2);

fn cluster() -> Option<(TestDir, EtcdCluster, Etcd)> {
    if !tools_available(&["etcd", "etcdctl"]) {
        return None;
    }
    let dir = TestDir::new();
    let cluster = EtcdCluster::start(dir.path(), 3);
    let etcd = Etcd::new(&cluster.endpoints(), TIMEOUT).expect("client");
    Some((dir, cluster, etcd))
}

fn keys(kvs: &[Kv]) -> Vec<&[u8]> {
    kvs.iter().map(|kv| kv.key.as_slice()).collect()
}

fn put_op(key: &[u8], value: &[u8], lease: LeaseId) -> Op {
    Op::Put {
        key: key.to_vec(),
        value: value.to_vec(),
        lease,
    }
}

#[test]
fn put_get_delete() {
    let Some((_dir, _cluster, etcd)) = cluster() else {
        return;
    };
    assert_eq!(etcd.get(b"img/a").unwrap(), None);
    let r1 = etcd.put(b"img/a", b"1", 0).unwrap();
    let r2 = etcd.put(b"img/b", b"", 0).unwrap();
    let r3 = etcd.put(b"img/a", b"one", 0).unwrap();
    etcd.put(b"imh", b"outside the prefix", 0).unwrap();
    etcd.put(&[b'x', 0xff], b"ff", 0).unwrap();
    assert!(r1 < r2 && r2 < r3);

    let a = etcd.get(b"img/a").unwrap().unwrap();
    assert_eq!(a.value, b"one");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (r1, r3, 2));
    assert_eq!(a.lease, 0);
    assert_eq!(etcd.get(b"img/b").unwrap().unwrap().value, b"");

    let (kvs, rev) = etcd.get_prefix(b"img/").unwrap();
    assert_eq!(keys(&kvs), [&b"img/a"[..], b"img/b"]);
    assert!(rev >= r3 + 2);
    // A prefix ending in 0xff still ends the range correctly.
    let (kvs, _) = etcd.get_prefix(&[b'x', 0xff]).unwrap();
    assert_eq!(kvs.len(), 1);
    let (all, _) = etcd.get_prefix(b"").unwrap();
    assert_eq!(all.len(), 4);

    let d = etcd.delete(b"img/a").unwrap();
    assert!(d > rev);
    assert_eq!(etcd.get(b"img/a").unwrap(), None);
    // Deleting nothing does not move the revision.
    assert_eq!(etcd.delete(b"img/none").unwrap(), d);
    etcd.put(b"img/c", b"3", 0).unwrap();
    etcd.delete_prefix(b"img/").unwrap();
    assert!(etcd.get_prefix(b"img/").unwrap().0.is_empty());
    assert!(etcd.get(b"imh").unwrap().is_some());
}

#[test]
fn txn_branches() {
    let Some((_dir, _cluster, etcd)) = cluster() else {
        return;
    };
    let create = |value: &[u8]| Txn {
        compare: vec![Compare::Version(b"own/x".to_vec(), Cmp::Equal, 0)],
        success: vec![put_op(b"own/x", value, 0), Op::Get(b"own/x".to_vec())],
        failure: vec![Op::Get(b"own/x".to_vec()), Op::GetPrefix(b"own/".to_vec())],
    };
    // Create-if-absent: the first wins, the second sees the winner's value.
    let first: TxnResult = etcd.txn(&create(b"a")).unwrap();
    assert!(first.succeeded);
    assert_eq!(first.responses.len(), 2);
    assert!(first.responses[0].is_empty());
    assert_eq!(first.responses[1][0].value, b"a");
    let second = etcd.txn(&create(b"b")).unwrap();
    assert!(!second.succeeded);
    assert_eq!(second.revision, first.revision);
    assert_eq!(second.responses[0][0].value, b"a");
    assert_eq!(second.responses[1].len(), 1);

    // Compare-and-swap on mod_revision: only the holder of the current revision writes.
    let rev = etcd.get(b"own/x").unwrap().unwrap().mod_revision;
    let cas = |expect: i64, value: &[u8]| Txn {
        compare: vec![Compare::ModRevision(b"own/x".to_vec(), Cmp::Equal, expect)],
        success: vec![put_op(b"own/x", value, 0)],
        failure: vec![],
    };
    let won = etcd.txn(&cas(rev, b"c")).unwrap();
    assert!(won.succeeded && won.revision > rev);
    let lost = etcd.txn(&cas(rev, b"d")).unwrap();
    assert!(!lost.succeeded && lost.responses.is_empty());
    assert_eq!(etcd.get(b"own/x").unwrap().unwrap().value, b"c");

    // Value and lease compares, delete ops.
    let lease = etcd.lease_grant(30).unwrap();
    etcd.put(b"own/y", b"held", lease).unwrap();
    let t = Txn {
        compare: vec![
            Compare::Lease(b"own/y".to_vec(), Cmp::Equal, lease),
            Compare::Value(b"own/x".to_vec(), Cmp::Equal, b"c".to_vec()),
            Compare::CreateRevision(b"own/x".to_vec(), Cmp::Less, won.revision),
        ],
        success: vec![
            Op::Delete(b"own/x".to_vec()),
            Op::DeletePrefix(b"own/y".to_vec()),
        ],
        failure: vec![],
    };
    let done = etcd.txn(&t).unwrap();
    assert!(done.succeeded);
    assert_eq!(done.responses, vec![Vec::<Kv>::new(), vec![]]);
    assert!(etcd.get_prefix(b"own/").unwrap().0.is_empty());
    let wrong_lease = Txn {
        compare: vec![Compare::Lease(b"own/y".to_vec(), Cmp::NotEqual, 0)],
        ..Txn::default()
    };
    assert!(!etcd.txn(&wrong_lease).unwrap().succeeded);

    // etcd refuses a txn that writes one key twice: a final Status, not a retry elsewhere.
    let dup = Txn {
        success: vec![put_op(b"k", b"1", 0), put_op(b"k", b"2", 0)],
        ..Txn::default()
    };
    match etcd.txn(&dup) {
        Err(EtcdError::Status { code: 3, message }) => assert!(message.contains("duplicate")),
        other => panic!("duplicate-key txn: {other:?}"),
    }
}

#[test]
fn leases() {
    let Some((_dir, _cluster, etcd)) = cluster() else {
        return;
    };
    // Kept alive past its TTL, the key stays; revoked, it goes.
    let kept = etcd.lease_grant(2).unwrap();
    etcd.put(b"node/a", b"alive", kept).unwrap();
    assert_eq!(etcd.get(b"node/a").unwrap().unwrap().lease, kept);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let ttl = etcd.lease_keepalive(kept).unwrap();
        assert!(ttl > 0 && ttl <= 2, "ttl {ttl}");
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(etcd.get(b"node/a").unwrap().is_some());
    etcd.lease_revoke(kept).unwrap();
    assert_eq!(etcd.get(b"node/a").unwrap(), None);
    assert_eq!(etcd.lease_keepalive(kept).unwrap(), 0);
    assert!(matches!(
        etcd.lease_revoke(kept),
        Err(EtcdError::Status { code: 5, .. })
    ));
    assert!(matches!(
        etcd.put(b"node/a", b"late", kept),
        Err(EtcdError::Status { code: 5, .. })
    ));

    // Left alone, a 1 s lease expires and takes its key.
    let short = etcd.lease_grant(1).unwrap();
    etcd.put(b"node/b", b"alive", short).unwrap();
    let started = Instant::now();
    assert!(wait_until(Duration::from_secs(6), || etcd
        .get(b"node/b")
        .unwrap()
        .is_none()));
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(etcd.lease_keepalive(short).unwrap(), 0);
}

#[test]
fn watch_in_order_and_compaction() {
    let Some((_dir, cluster, etcd)) = cluster() else {
        return;
    };
    etcd.put(b"other", b"x", 0).unwrap();
    let start = etcd.put(b"w/a", b"1", 0).unwrap();
    etcd.put(b"w/b", b"2", 0).unwrap();
    etcd.delete(b"w/a").unwrap();
    etcd.put(b"outside", b"x", 0).unwrap();
    let both = Txn {
        success: vec![put_op(b"w/c", b"3", 0), Op::Delete(b"w/b".to_vec())],
        ..Txn::default()
    };
    let last = etcd.txn(&both).unwrap().revision;

    // From a past revision: every change under the prefix, in order, nothing else.
    let mut watch = etcd
        .watch(b"w/", start, Some(Duration::from_secs(5)))
        .unwrap();
    let mut seen = Vec::new();
    let mut upto = 0;
    while upto < last {
        let (events, rev) = watch.next().unwrap();
        assert!(rev > upto);
        upto = rev;
        seen.extend(events);
    }
    let got: Vec<(EventKind, &[u8], &[u8])> = seen
        .iter()
        .map(|e| (e.kind.clone(), e.kv.key.as_slice(), e.kv.value.as_slice()))
        .collect();
    use EventKind::{Delete, Put};
    let want: Vec<(EventKind, &[u8], &[u8])> = vec![
        (Put, b"w/a", b"1"),
        (Put, b"w/b", b"2"),
        (Delete, b"w/a", b""),
        (Put, b"w/c", b"3"),
        (Delete, b"w/b", b""),
    ];
    assert_eq!(got, want);
    assert_eq!(seen[0].kv.mod_revision, start);
    assert_eq!(seen[4].kv.mod_revision, last);

    // From now: a later put, then nothing: the idle bound ends the wait.
    let mut live = etcd
        .watch(b"w/", 0, Some(Duration::from_millis(300)))
        .unwrap();
    let rev = etcd.put(b"w/d", b"4", 0).unwrap();
    let (events, upto) = live.next().unwrap();
    assert_eq!((events.len(), upto), (1, rev));
    assert_eq!(events[0].kv.key, b"w/d");
    let t = Instant::now();
    assert!(matches!(live.next(), Err(EtcdError::WatchIdle(_))));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(matches!(live.next(), Err(EtcdError::WatchClosed)));

    // Compacted history: a watch from before the compaction point is told so.
    cluster.etcdctl(&["compact", &last.to_string()]);
    let compacted = etcd
        .watch(b"w/", start, Some(Duration::from_secs(5)))
        .and_then(|mut w| w.next());
    match compacted {
        Err(EtcdError::Compacted { compact_revision }) => assert_eq!(compact_revision, last),
        other => panic!("watch from a compacted revision: {:?}", other.map(|r| r.1)),
    }
    // From the compaction point on, it works. History comes in one batch, up to the current
    // revision: the txn's two events at `last` and the later put at `rev`.
    let mut after = etcd
        .watch(b"w/", last, Some(Duration::from_secs(5)))
        .unwrap();
    // Quirk: compaction at `last` also drops the tombstone of the delete at `last`, so such a
    // watch misses that delete (after Compacted: get_prefix, then watch from its revision + 1).
    let (events, upto) = after.next().unwrap();
    let got: Vec<(&[u8], i64)> = events
        .iter()
        .map(|e| (e.kv.key.as_slice(), e.kv.mod_revision))
        .collect();
    assert_eq!(got, [(&b"w/c"[..], last), (b"w/d", rev)]);
    assert_eq!(upto, rev);
}

#[test]
fn fail_over_and_quorum_loss() {
    let Some((_dir, mut cluster, etcd)) = cluster() else {
        return;
    };
    // The client starts on the first endpoint; kill that member. It may be the leader: then
    // the next member holds a put until a new leader is elected (or drops it), and the call
    // moves on to the third within its timeout. A caller retries an Unreachable call; allow
    // one retry here, for an election that outlasts the call.
    etcd.put(b"f/1", b"1", 0).unwrap();
    cluster.kill(0);
    let t = Instant::now();
    if let Err(e) = etcd.put(b"f/2", b"2", 0) {
        eprintln!(
            "first put after the kill failed after {:?}: {e}",
            t.elapsed()
        );
        etcd.put(b"f/2", b"2", 0).unwrap();
    }
    eprintln!("put after the kill took {:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(etcd.get(b"f/1").unwrap().unwrap().value, b"1");
    assert_eq!(etcd.get_prefix(b"f/").unwrap().0.len(), 2);
    assert!(t.elapsed() < TIMEOUT, "{:?}", t.elapsed());
    let mut watch = etcd.watch(b"f/", 0, Some(Duration::from_secs(5))).unwrap();
    etcd.put(b"f/3", b"3", 0).unwrap();
    assert_eq!(watch.next().unwrap().0[0].kv.key, b"f/3");

    drop(watch);
    // A watch on the member that will be left alone.
    let survivor = Etcd::new(&cluster.endpoints()[2..], TIMEOUT).unwrap();
    let mut lonely = survivor
        .watch(b"f/", 0, Some(Duration::from_secs(10)))
        .unwrap();

    // Majority gone: a put fails within the timeout, not forever; the survivor's watch ends
    // (the member cancels it once it has had no leader for a while) instead of going quiet.
    cluster.kill(1);
    let t = Instant::now();
    let ended = lonely.next().unwrap_err();
    eprintln!(
        "watch without quorum ended after {:?}: {ended}",
        t.elapsed()
    );
    assert!(!matches!(ended, EtcdError::WatchIdle(_)), "{ended}");
    let t = Instant::now();
    let err = etcd.put(b"f/4", b"4", 0).unwrap_err();
    let took = t.elapsed();
    eprintln!("put without quorum failed after {took:?}: {err}");
    assert!(took < TIMEOUT + Duration::from_secs(1), "{took:?}: {err}");
    assert!(
        matches!(
            err,
            EtcdError::Unreachable { .. } | EtcdError::Status { .. }
        ),
        "{err}"
    );

    // Back to a quorum: puts succeed again (after an election).
    cluster.restart(0);
    cluster.restart(1);
    let mut last_err = None;
    let ok = wait_until(Duration::from_secs(15), || {
        match etcd.put(b"f/4", b"4", 0) {
            Ok(_) => true,
            Err(e) => {
                last_err = Some(e);
                false
            }
        }
    });
    assert!(ok, "put after restart: {last_err:?}");
    assert_eq!(etcd.get_prefix(b"f/").unwrap().0.len(), 4);
    assert!(cluster.is_running(0) && cluster.is_running(1) && cluster.is_running(2));
}
