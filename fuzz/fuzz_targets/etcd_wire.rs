//! Fuzzes what an etcd member (or whatever answers on its port) sends the client: every
//! answer type, through the decoders the client runs on it (`meta::etcd::fuzzing` calls the
//! same functions as `Etcd`'s methods, minus the HTTP).
//!
//! Input: a selector byte, then the answer. The selector picks the call: range of one key,
//! range of a prefix, put/delete/revoke, txn (bits 4-7 give the sizes of the txn's success and
//! failure branches, 0 to 3 ops each), lease grant, keep-alive, an error answer (the next two
//! bytes are the HTTP status), or a watch stream read to its end.
//!
//! Checks: nothing panics; a txn's result has one entry per op of the branch it reports taken;
//! a watch gives at most as many batches as the stream has bytes, every batch non-empty, and
//! ends with an error (a watch never just stops).
#![no_main]

use cormorant::meta::etcd::{fuzzing, Op, Txn};
use libfuzzer_sys::fuzz_target;

fn ops(n: u8) -> Vec<Op> {
    (0..n % 4)
        .map(|i| match i {
            0 => Op::Get(b"k".to_vec()),
            1 => Op::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                lease: 0,
            },
            _ => Op::GetPrefix(b"p/".to_vec()),
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, answer)) = data.split_first() else {
        return;
    };
    match selector % 8 {
        0 => {
            let _ = fuzzing::get(answer);
        }
        1 => {
            let _ = fuzzing::get_prefix(answer);
        }
        2 => {
            let _ = fuzzing::header_only(answer);
        }
        3 => {
            let txn = Txn {
                compare: Vec::new(),
                success: ops(selector >> 4),
                failure: ops(selector >> 6),
            };
            if let Ok(result) = fuzzing::txn(answer, &txn) {
                let branch = if result.succeeded {
                    &txn.success
                } else {
                    &txn.failure
                };
                assert_eq!(result.responses.len(), branch.len());
            }
        }
        4 => {
            let _ = fuzzing::lease_grant(answer);
        }
        5 => {
            let _ = fuzzing::lease_keepalive(answer);
        }
        6 => {
            let Some((status, body)) = answer.split_first_chunk::<2>() else {
                return;
            };
            let _ = fuzzing::error(u16::from_le_bytes(*status), body).to_string();
        }
        _ => {
            let Ok(mut watch) = fuzzing::watch(std::io::Cursor::new(answer.to_vec())) else {
                return;
            };
            let mut batches = 0;
            loop {
                match watch.next() {
                    Ok((events, _revision)) => {
                        assert!(!events.is_empty());
                        batches += 1;
                        assert!(batches <= answer.len(), "more batches than bytes");
                    }
                    Err(e) => {
                        let _ = e.to_string();
                        break;
                    }
                }
            }
            // Once ended, a watch stays ended.
            assert!(watch.next().is_err());
        }
    }
});
