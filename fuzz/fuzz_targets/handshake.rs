//! Fuzzes the peer handshake (`src/peer/auth.rs`): both sides, reading whatever the other end
//! sends (preamble, Hello, Challenge, Proof, Accept or Refuse frames), through the same code
//! that runs on a socket (`peer::auth::fuzzing` swaps the socket for bytes and fixes the
//! nonces).
//!
//! Input: a selector byte, then bytes. Bits 0-1 pick the mode:
//! - 0: the server reads the bytes as they are;
//! - 1: the client reads the bytes as they are;
//! - 2: the server reads a well-formed preamble and a Hello whose payload is the bytes, then
//!   the Proof a key holder would send for that Hello (so the checks after the proof are
//!   reached);
//! - 3: the client reads a well-formed preamble, Challenge and the Accept a key holder would
//!   send, then the bytes.
//!
//! Bit 2 is this side's `--peer-encrypt`; in mode 3, bit 3 sets the peer's id to one the client
//! did not ask for, which changes the proof.
//!
//! Checks: nothing panics; without the key's proof no handshake succeeds; with it, the server
//! accepts exactly when the Hello names it and agrees on encryption, and the client accepts
//! exactly when it reached the server it meant to; a Hello that parses re-encodes to the same
//! bytes.
#![no_main]

use cormorant::image::NodeId;
use cormorant::peer::auth::{fuzzing, ClusterKey, AuthError, FLAG_ENCRYPT, MAGIC, VERSION};
use cormorant::peer::frame::{encode, Kind};
use libfuzzer_sys::fuzz_target;

const NONCE_C: [u8; 32] = [7; 32];
const NONCE_S: [u8; 32] = [9; 32];

fn preamble() -> Vec<u8> {
    [&MAGIC[..], &VERSION.to_le_bytes()].concat()
}

fn node(id: &str) -> NodeId {
    id.parse().expect("a valid node id")
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let key = ClusterKey::from_bytes(&[0x5a; 32]).expect("a 32-byte key");
    let encrypt = selector & 4 != 0;
    let (me, peer) = (node("server-1"), node("client-1"));
    match selector % 4 {
        0 => assert!(fuzzing::server(bytes, &me, &key, encrypt, NONCE_S).is_err()),
        1 => assert!(fuzzing::client(bytes, &peer, &me, &key, encrypt, NONCE_C).is_err()),
        2 => {
            let Ok(hello) = encode(Kind::Hello, 0, bytes) else {
                return;
            };
            let mut input = [preamble(), hello].concat();
            let parsed = fuzzing::parse_hello(bytes);
            if let Ok((client, server, nonce_c, flags)) = &parsed {
                let again = fuzzing::hello(client.as_str(), server.as_str(), nonce_c, *flags);
                assert_eq!(again, bytes, "a parsed Hello re-encodes to itself");
                let (proof, _) =
                    fuzzing::proofs(&key, client.as_str(), server.as_str(), *nonce_c, NONCE_S, *flags);
                input.extend(encode(Kind::Proof, 0, &proof).expect("a proof frame"));
            }
            let result = fuzzing::server(&input, &me, &key, encrypt, NONCE_S);
            match &parsed {
                Err(_) => assert!(result.is_err()),
                Ok((client, server, _, flags)) => {
                    let agrees = (flags & FLAG_ENCRYPT != 0) == encrypt;
                    match result {
                        Ok(id) => {
                            assert_eq!(&id, client);
                            assert!(*server == me && agrees);
                        }
                        Err(AuthError::WrongNode { .. }) => assert!(*server != me),
                        Err(AuthError::EncryptMismatch { .. }) => assert!(!agrees),
                        Err(e) => panic!("a key holder's handshake failed: {e}"),
                    }
                }
            }
        }
        _ => {
            // The server answers as `actual`; the client asked for `me`.
            let actual = if selector & 8 != 0 { node("server-2") } else { me.clone() };
            let flags = if encrypt { FLAG_ENCRYPT } else { 0 };
            let (_, accept) =
                fuzzing::proofs(&key, peer.as_str(), actual.as_str(), NONCE_C, NONCE_S, flags);
            let input = [
                preamble(),
                encode(Kind::Challenge, 0, &NONCE_S).expect("a challenge frame"),
                encode(Kind::Accept, 0, &accept).expect("an accept frame"),
                bytes.to_vec(),
            ]
            .concat();
            let result = fuzzing::client(&input, &peer, &me, &key, encrypt, NONCE_C);
            assert_eq!(result.is_ok(), actual == me, "{result:?}");
        }
    }
});
