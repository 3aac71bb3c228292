//! Fuzzes both directions of the control protocol (`src/control/`): the request line the
//! daemon reads from whoever connects to control.sock (`server::read_request`) and the answer
//! lines the client reads back (`client::read_answer`).
//!
//! Input: a selector byte, then the bytes on the socket. Even selectors feed the server side,
//! odd ones the client side.
//!
//! Checks: nothing panics; a request that parses re-encodes to JSON that parses to the same
//! request, and so does a reply without floating-point numbers (serde_json reads those to
//! within an ulp, not exactly, and the daemon never sends any); an answer's progress lines
//! never outnumber its lines.
#![no_main]

use cormorant::control::client::read_answer;
use cormorant::control::protocol::{Reply, Request};
use cormorant::control::server::read_request;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Whether `value` holds a number that is neither an i64 nor a u64.
fn has_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    if selector % 2 == 0 {
        if let Ok(request) = read_request(bytes) {
            let text = serde_json::to_string(&request).expect("a request encodes");
            let again: Request = serde_json::from_str(&text).expect("an encoded request parses");
            assert_eq!(again, request);
        }
    } else {
        let mut lines = 0usize;
        let _ = read_answer(bytes, |_, _| lines += 1);
        assert!(lines <= bytes.iter().filter(|&&b| b == b'\n').count() + 1);
        // Each line on its own, as the client reads it.
        for line in bytes.split(|&b| b == b'\n') {
            if let Ok(reply) = serde_json::from_slice::<Reply>(line) {
                if matches!(&reply, Reply::Ok(value) if has_float(value)) {
                    continue;
                }
                let text = serde_json::to_string(&reply).expect("a reply encodes");
                let again: Reply = serde_json::from_str(&text).expect("an encoded reply parses");
                assert_eq!(again, reply);
            }
        }
    }
});
