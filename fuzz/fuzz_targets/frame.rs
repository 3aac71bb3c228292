//! Fuzzes what a peer controls: the bytes of a connection after the handshake. They are
//! fed to the frame decoder in pieces (sizes taken from the input), and every frame that
//! decodes is parsed as a request and as a response.
//!
//! Input: a first byte (piece size in its low 6 bits; its top bit picks sealed mode, the next
//! one a session), then the stream. In sealed mode the rest is a list of (kind u8, length
//! u8, payload) records that are framed with correct checksums first (and, with a session,
//! tags), so the message decoders are reached without the fuzzer having to solve a CRC or
//! a MAC. With a session the decoder checks tags, as it does after the handshake.
//!
//! Checks: nothing panics; a decoded frame re-encodes (re-seals) to exactly the bytes it came
//! from; a message that decodes re-encodes to a payload that decodes to the same message.
#![no_main]

use cormorant::peer::frame::{self, Decoder, Frame, Kind, MAX_PAYLOAD};
use cormorant::peer::message::{Request, Response};
use cormorant::peer::seal::{Sealer, Session};
use libfuzzer_sys::fuzz_target;

fn check_messages(frame: &Frame) {
    if let Ok(request) = Request::decode(frame.kind, frame.payload.clone()) {
        let payload = request.clone().encode().expect("a decoded request encodes");
        let bytes = [payload.head, payload.body].concat();
        assert_eq!(Request::decode(payload.kind, bytes).unwrap(), request);
    }
    if let Ok(response) = Response::decode(frame.kind, frame.payload.clone()) {
        let payload = response
            .clone()
            .encode()
            .expect("a decoded response encodes");
        let bytes = [payload.head, payload.body].concat();
        assert_eq!(Response::decode(payload.kind, bytes).unwrap(), response);
    }
}

/// Frames each (kind, length, payload) record with a correct header; unknown kinds are
/// skipped.
fn seal(mut records: &[u8], mut sealer: Option<Sealer>) -> Vec<u8> {
    let mut stream = Vec::new();
    let mut id = 0u64;
    while let [kind, len, rest @ ..] = records {
        let len = usize::from(*len).min(rest.len());
        if let Some(kind) = Kind::from_u8(*kind) {
            id += 1;
            stream.extend(encode(kind, id, &rest[..len], sealer.as_mut()));
        }
        records = &rest[len..];
    }
    stream
}

fn encode(kind: Kind, id: u64, payload: &[u8], sealer: Option<&mut Sealer>) -> Vec<u8> {
    match sealer {
        Some(sealer) => frame::encode_sealed(kind, id, payload, sealer).unwrap(),
        None => frame::encode(kind, id, payload).unwrap(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (sender, receiver) = Session::pair(&[0x11; 32], &[0x22; 32]);
    let session = first & 0x40 != 0;
    let sealed;
    let stream = if first & 0x80 != 0 {
        sealed = seal(rest, session.then(|| sender.sealer.clone()));
        &sealed[..]
    } else {
        rest
    };
    let step = usize::from(first % 64) + 1;
    let (mut decoder, mut resealer) = match session {
        true => (
            Decoder::sealed(MAX_PAYLOAD, receiver.opener),
            Some(sender.sealer),
        ),
        false => (Decoder::new(MAX_PAYLOAD), None),
    };
    let mut start = 0;
    let mut at = 0;
    while at < stream.len() {
        let end = (at + step).min(stream.len());
        match decoder.push(&stream[at..end]) {
            Ok((used, frame)) => {
                at += used;
                if let Some(frame) = frame {
                    let again = encode(frame.kind, frame.id, &frame.payload, resealer.as_mut());
                    assert_eq!(again, &stream[start..at]);
                    check_messages(&frame);
                    start = at;
                }
            }
            Err(_) => return,
        }
    }
});
