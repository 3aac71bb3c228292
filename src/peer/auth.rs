//! The handshake that opens every peer connection, and the cluster key it proves.
//!
//! ```text
//! client                                              server
//!   preamble (b"CORMORANT", version u16) + Hello  ->
//!                                                 <-  preamble + Challenge
//!   Proof = HMAC(key, client label | transcript)  ->
//!                                                 <-  Accept = HMAC(key, server label | transcript)
//!                                                     or Refuse (reason), then close
//! transcript = nonce_c | nonce_s | len | client id | len | server id | flags
//! client->server key = HMAC(key, "cormorant/2 client frames" | transcript)
//! server->client key = HMAC(key, "cormorant/2 server frames" | transcript)
//! ```
//!
//! Each side leaves the handshake with a [`Session`]: the key of each direction, with which
//! every later frame is tagged (see [`super::seal`]), or with `--peer-encrypt` (bit 0 of the
//! Hello's flags, which both sides must agree on) encrypted. Fresh nonces make every
//! connection's keys new.
//!
//! Both sides prove they hold the key over fresh nonces from both, so a recorded handshake is
//! worth nothing and a reflected proof fails (the labels differ). The server reads nothing but
//! these frames, each at most [`MAX_HANDSHAKE_PAYLOAD`] bytes, and gives up after
//! [`HANDSHAKE_TIMEOUT`]; it says nothing about itself before the client's proof checks out.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::frame::{self, Decoder, Frame, FrameError, Kind};
pub use super::seal::Session;
use super::seal::{Opener, Sealer, SESSION_KEY_LEN};
use crate::image::{LocationError, NodeId};

/// The first bytes each side sends: anything else is not a Cormorant peer.
pub const MAGIC: [u8; 9] = *b"CORMORANT";

/// The protocol version this build speaks; a peer speaking another one is refused. 2: every
/// frame after the handshake carries a tag (version 1 frames had only a CRC).
pub const VERSION: u16 = 3;

/// Magic and version.
pub const PREAMBLE_LEN: usize = MAGIC.len() + 2;

/// A whole handshake must finish within this. Peers are on a LAN, where it takes two round
/// trips of well under a millisecond; 5 s covers a loaded machine and still frees the slot of
/// a client that connects and says nothing.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;

/// Largest handshake payload: a Hello is at most 1 + 64 + 1 + 64 + 32 + 1 = 163 bytes, a Refuse
/// at most 1 + [`MAX_REFUSE_REASON`].
pub const MAX_HANDSHAKE_PAYLOAD: usize = 256;

/// Longest reason in a Refuse frame.
pub const MAX_REFUSE_REASON: usize = 200;

/// Shortest key: 256 bits, the HMAC-SHA256 block of security.
pub const MIN_KEY_LEN: usize = 32;

/// Largest key file read: a key is a line of hex or a few dozen raw bytes, not a document.
pub const MAX_KEY_FILE: u64 = 4096;

const CLIENT_LABEL: &[u8] = b"cormorant/2 client proof";
const SERVER_LABEL: &[u8] = b"cormorant/2 server proof";
/// Labels of the session keys, one per direction; distinct from the proofs' labels, so no
/// proof (which goes over the wire) is ever a key.
const CLIENT_FRAMES_LABEL: &[u8] = b"cormorant/2 client frames";
const SERVER_FRAMES_LABEL: &[u8] = b"cormorant/2 server frames";

/// Bit of the Hello's flags byte: frames after the handshake are encrypted.
pub const FLAG_ENCRYPT: u8 = 0x01;

type HmacSha256 = Hmac<Sha256>;

/// The secret every node of a cluster shares. Cheap to clone; never printed.
#[derive(Clone)]
pub struct ClusterKey {
    mac: HmacSha256,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read cluster key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cluster key file {path} is over {MAX_KEY_FILE} bytes: not a key file")]
    TooLarge { path: PathBuf },
    #[error(
        "cluster key file {path} has mode {mode:04o}: group or others can read it; run `chmod 600 {path}`",
        path = path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "cluster key is {len} bytes: at least {MIN_KEY_LEN} bytes or 64 hex characters are needed"
    )]
    TooShort { len: usize },
}

impl ClusterKey {
    /// Reads a key file: 64 or more hex characters, or at least 32 raw bytes, with
    /// surrounding whitespace ignored. A file that group or others can read (or write) is
    /// refused: a key anyone on the node can copy proves nothing about membership.
    pub fn from_file(path: &Path) -> Result<ClusterKey, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        let mode = file.metadata().map_err(read_err)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
        let mut bytes = Vec::new();
        file.take(MAX_KEY_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_KEY_FILE {
            return Err(KeyError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        ClusterKey::from_bytes(&bytes)
    }

    /// A key from a key file's contents (same rules as [`ClusterKey::from_file`]).
    pub fn from_bytes(contents: &[u8]) -> Result<ClusterKey, KeyError> {
        let text = contents.trim_ascii();
        let is_hex = text.len() >= 2 * MIN_KEY_LEN
            && text.len().is_multiple_of(2)
            && text.iter().all(u8::is_ascii_hexdigit);
        let secret: Vec<u8> = if is_hex {
            text.chunks(2)
                .map(|pair| (hex(pair[0]) << 4) | hex(pair[1]))
                .collect()
        } else {
            text.to_vec()
        };
        if secret.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort { len: secret.len() });
        }
        let mac = HmacSha256::new_from_slice(&secret)
            .map_err(|_| KeyError::TooShort { len: secret.len() })?;
        Ok(ClusterKey { mac })
    }

    fn keyed(&self, label: &[u8], t: &Transcript) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(label);
        mac.update(&t.nonce_c);
        mac.update(&t.nonce_s);
        for id in [&t.client, &t.server] {
            mac.update(&[id.len() as u8]);
            mac.update(id.as_bytes());
        }
        mac.update(&[t.flags]);
        mac
    }

    fn proof(&self, label: &[u8], t: &Transcript) -> Vec<u8> {
        self.keyed(label, t).finalize().into_bytes().to_vec()
    }

    /// The session keys of a connection whose handshake `t` describes, as `side` sees them.
    fn session(&self, t: &Transcript, side: Side) -> Session {
        let derive = |label: &[u8]| -> [u8; SESSION_KEY_LEN] {
            self.keyed(label, t).finalize().into_bytes().into()
        };
        let (to_server, to_client) = (derive(CLIENT_FRAMES_LABEL), derive(SERVER_FRAMES_LABEL));
        let (send, receive) = match side {
            Side::Client => (to_server, to_client),
            Side::Server => (to_client, to_server),
        };
        if t.flags & FLAG_ENCRYPT != 0 {
            Session {
                sealer: Sealer::encrypting(&send),
                opener: Opener::decrypting(&receive),
            }
        } else {
            Session {
                sealer: Sealer::new(&send),
                opener: Opener::new(&receive),
            }
        }
    }

    /// Constant-time check of a proof.
    fn verify(&self, label: &[u8], t: &Transcript, proof: &[u8]) -> bool {
        self.keyed(label, t).verify_slice(proof).is_ok()
    }
}

fn on_off(flag: bool) -> &'static str {
    if flag {
        "on"
    } else {
        "off"
    }
}

fn hex(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}

/// What both proofs and the session keys cover.
struct Transcript {
    nonce_c: [u8; NONCE_LEN],
    nonce_s: [u8; NONCE_LEN],
    client: String,
    server: String,
    /// The Hello's flags byte ([`FLAG_ENCRYPT`]).
    flags: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The connection failed, closed or timed out: the peer may simply be down.
    #[error("handshake I/O: {0}")]
    Io(#[from] io::Error),
    #[error("bad handshake frame: {0}")]
    Frame(#[from] FrameError),
    #[error("the peer is not a Cormorant node (bad magic)")]
    BadMagic,
    #[error("protocol version mismatch: this node speaks {ours}, the peer speaks {theirs}")]
    Version { ours: u16, theirs: u16 },
    #[error("unexpected {0:?} frame in the handshake")]
    Unexpected(Kind),
    #[error("malformed {0:?} frame in the handshake")]
    Malformed(Kind),
    #[error("bad node id in the handshake: {0}")]
    BadNodeId(#[source] LocationError),
    #[error("the peer's proof is wrong: it does not hold this cluster key")]
    BadProof,
    #[error("the peer calls this node '{claimed}', but it is '{actual}'")]
    WrongNode { claimed: String, actual: String },
    #[error(
        "peer frame encryption differs: this node (server) runs with --peer-encrypt {}, the client with --peer-encrypt {}",
        on_off(*server), on_off(*client)
    )]
    EncryptMismatch { server: bool, client: bool },
    #[error("refused by the peer: {0}")]
    Refused(String),
    #[error("no random numbers for a nonce: {0}")]
    Random(#[source] getrandom::Error),
}

impl AuthError {
    /// True when the failure says nothing about keys or versions (connection trouble).
    pub fn is_io(&self) -> bool {
        matches!(self, AuthError::Io(_))
    }
}

/// A stream whose every read and write must finish by one deadline.
struct Timed<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Timed<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake timed out",
            ));
        }
        Ok(left)
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut bytes = [0u8; PREAMBLE_LEN];
    bytes[..MAGIC.len()].copy_from_slice(&MAGIC);
    bytes[MAGIC.len()..].copy_from_slice(&VERSION.to_le_bytes());
    bytes
}

/// Reads the peer's preamble and returns its version.
fn read_preamble(s: &mut impl Read) -> Result<u16, AuthError> {
    let mut bytes = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut bytes)?;
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(AuthError::BadMagic);
    }
    Ok(u16::from_le_bytes([
        bytes[MAGIC.len()],
        bytes[MAGIC.len() + 1],
    ]))
}

fn check_version(theirs: u16) -> Result<(), AuthError> {
    if theirs != VERSION {
        return Err(AuthError::Version {
            ours: VERSION,
            theirs,
        });
    }
    Ok(())
}

fn send(s: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), AuthError> {
    s.write_all(&frame::encode(kind, 0, payload)?)?;
    Ok(())
}

/// Reads the next handshake frame, which must be `expected` (a Refuse becomes an error).
fn receive(s: &mut impl Read, expected: Kind) -> Result<Frame, AuthError> {
    let frame = match Decoder::new(MAX_HANDSHAKE_PAYLOAD).read_from(s) {
        Ok(Some(frame)) => frame,
        Ok(None) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
        Err(frame::ReadError::Io(e)) => return Err(e.into()),
        Err(frame::ReadError::Frame(e)) => return Err(e.into()),
    };
    if frame.kind == Kind::Refuse && expected != Kind::Refuse {
        let reason = frame.payload.get(1..).unwrap_or_default();
        return Err(AuthError::Refused(
            String::from_utf8_lossy(reason).into_owned(),
        ));
    }
    if frame.kind != expected {
        return Err(AuthError::Unexpected(frame.kind));
    }
    Ok(frame)
}

fn refuse(s: &mut impl Write, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(MAX_REFUSE_REASON)];
    let payload = [&[reason.len() as u8][..], reason].concat();
    // The connection closes next either way; a failed send changes nothing.
    let _ = send(s, Kind::Refuse, &payload);
}

fn nonce() -> Result<[u8; NONCE_LEN], AuthError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(AuthError::Random)?;
    Ok(nonce)
}

fn hello_payload(client: &str, server: &str, nonce_c: &[u8; NONCE_LEN], flags: u8) -> Vec<u8> {
    let mut payload = Vec::with_capacity(3 + client.len() + server.len() + NONCE_LEN);
    for id in [client, server] {
        payload.push(id.len() as u8);
        payload.extend_from_slice(id.as_bytes());
    }
    payload.extend_from_slice(nonce_c);
    payload.push(flags);
    payload
}

/// What a Hello says: client id, the server id the client means to reach, the client's
/// nonce and its flags.
type Hello = (NodeId, NodeId, [u8; NONCE_LEN], u8);

/// Parses a Hello; flags other than [`FLAG_ENCRYPT`] are malformed.
fn parse_hello(payload: &[u8]) -> Result<Hello, AuthError> {
    let malformed = || AuthError::Malformed(Kind::Hello);
    let mut rest = payload;
    let mut ids = Vec::with_capacity(2);
    for _ in 0..2 {
        let (&len, tail) = rest.split_first().ok_or_else(malformed)?;
        let len = len as usize;
        let text = tail.get(..len).ok_or_else(malformed)?;
        let text = std::str::from_utf8(text).map_err(|_| malformed())?;
        ids.push(text.parse::<NodeId>().map_err(AuthError::BadNodeId)?);
        rest = &tail[len..];
    }
    let (&flags, nonce) = rest.split_last().ok_or_else(malformed)?;
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| malformed())?;
    if flags & !FLAG_ENCRYPT != 0 {
        return Err(malformed());
    }
    let server = ids.pop().ok_or_else(malformed)?;
    let client = ids.pop().ok_or_else(malformed)?;
    Ok((client, server, nonce, flags))
}

fn exact<const N: usize>(frame: &Frame) -> Result<[u8; N], AuthError> {
    frame.payload[..]
        .try_into()
        .map_err(|_| AuthError::Malformed(frame.kind))
}

/// Opens a connection as `me` to the node `peer`: proves the key and checks the peer's proof.
/// Nothing but handshake frames is read or written; on success the stream is ready for
/// requests, each sealed with the session returned (encrypting if `encrypt`, which the server
/// must match). Timeouts set on `stream` are left behind for the caller to reset.
pub fn client_handshake(
    stream: &TcpStream,
    me: &NodeId,
    peer: &NodeId,
    key: &ClusterKey,
    encrypt: bool,
    timeout: Duration,
) -> Result<Session, AuthError> {
    let mut s = Timed {
        stream,
        deadline: Instant::now() + timeout,
    };
    client_steps(&mut s, me, peer, key, encrypt, nonce()?)
}

/// The client's side of the handshake over any stream, with its nonce given.
fn client_steps(
    s: &mut (impl Read + Write),
    me: &NodeId,
    peer: &NodeId,
    key: &ClusterKey,
    encrypt: bool,
    nonce_c: [u8; NONCE_LEN],
) -> Result<Session, AuthError> {
    let (client, server) = (me.to_string(), peer.to_string());
    let flags = if encrypt { FLAG_ENCRYPT } else { 0 };
    let hello = frame::encode(
        Kind::Hello,
        0,
        &hello_payload(&client, &server, &nonce_c, flags),
    )?;
    s.write_all(&[&preamble()[..], &hello].concat())?;
    check_version(read_preamble(s)?)?;
    let nonce_s = exact(&receive(s, Kind::Challenge)?)?;
    let t = Transcript {
        nonce_c,
        nonce_s,
        client,
        server,
        flags,
    };
    send(s, Kind::Proof, &key.proof(CLIENT_LABEL, &t))?;
    let accept = receive(s, Kind::Accept)?;
    if !key.verify(SERVER_LABEL, &t, &accept.payload) {
        return Err(AuthError::BadProof);
    }
    Ok(key.session(&t, Side::Client))
}

/// Accepts a connection as `me`: checks the client's proof, then proves the key back.
/// Returns the client's node id and the session that seals every later frame. A client that
/// fails is sent a Refuse (if it got as far as a proof) and the error; the caller closes the
/// connection. A client whose `--peer-encrypt` differs from `encrypt` is refused (after its
/// proof checks out: strangers learn nothing) with a reason naming both settings.
pub fn server_handshake(
    stream: &TcpStream,
    me: &NodeId,
    key: &ClusterKey,
    encrypt: bool,
    timeout: Duration,
) -> Result<(NodeId, Session), AuthError> {
    let mut s = Timed {
        stream,
        deadline: Instant::now() + timeout,
    };
    server_steps(&mut s, me, key, encrypt, nonce()?)
}

/// The server's side of the handshake over any stream, with its nonce given.
fn server_steps(
    s: &mut (impl Read + Write),
    me: &NodeId,
    key: &ClusterKey,
    encrypt: bool,
    nonce_s: [u8; NONCE_LEN],
) -> Result<(NodeId, Session), AuthError> {
    let theirs = read_preamble(s)?;
    s.write_all(&preamble())?;
    check_version(theirs)?;
    let (client, claimed, nonce_c, flags) = parse_hello(&receive(s, Kind::Hello)?.payload)?;
    send(s, Kind::Challenge, &nonce_s)?;
    let t = Transcript {
        nonce_c,
        nonce_s,
        client: client.to_string(),
        server: claimed.to_string(),
        flags,
    };
    let proof = receive(s, Kind::Proof)?;
    if !key.verify(CLIENT_LABEL, &t, &proof.payload) {
        refuse(s, "authentication failed");
        return Err(AuthError::BadProof);
    }
    if claimed != *me {
        let error = AuthError::WrongNode {
            claimed: claimed.to_string(),
            actual: me.to_string(),
        };
        refuse(s, &error.to_string());
        return Err(error);
    }
    let theirs = flags & FLAG_ENCRYPT != 0;
    if theirs != encrypt {
        let error = AuthError::EncryptMismatch {
            server: encrypt,
            client: theirs,
        };
        refuse(s, &error.to_string());
        return Err(error);
    }
    send(s, Kind::Accept, &key.proof(SERVER_LABEL, &t))?;
    Ok((client, key.session(&t, Side::Server)))
}

/// Entry points for the fuzz target `handshake` (fuzz/fuzz_targets/handshake.rs): both sides of
/// the handshake run over bytes instead of a socket, with chosen nonces. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// A stream that reads `input` and swallows what is written.
    struct Scripted<'a> {
        input: &'a [u8],
    }

    impl Read for Scripted<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Scripted<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The server's handshake as `me`, reading what the client sent from `input`.
    pub fn server(
        input: &[u8],
        me: &NodeId,
        key: &ClusterKey,
        encrypt: bool,
        nonce_s: [u8; NONCE_LEN],
    ) -> Result<NodeId, AuthError> {
        server_steps(&mut Scripted { input }, me, key, encrypt, nonce_s).map(|(id, _)| id)
    }

    /// The client's handshake as `me` to `peer`, reading what the server sent from `input`.
    pub fn client(
        input: &[u8],
        me: &NodeId,
        peer: &NodeId,
        key: &ClusterKey,
        encrypt: bool,
        nonce_c: [u8; NONCE_LEN],
    ) -> Result<(), AuthError> {
        client_steps(&mut Scripted { input }, me, peer, key, encrypt, nonce_c).map(|_| ())
    }

    /// A Hello's fields (client id, server id, client nonce, flags), if it parses.
    pub fn parse_hello(payload: &[u8]) -> Result<(NodeId, NodeId, [u8; NONCE_LEN], u8), AuthError> {
        super::parse_hello(payload)
    }

    /// A Hello's payload as the client writes it.
    pub fn hello(client: &str, server: &str, nonce_c: &[u8; NONCE_LEN], flags: u8) -> Vec<u8> {
        hello_payload(client, server, nonce_c, flags)
    }

    /// The client's proof and the server's for one handshake: what a peer holding `key` sends.
    pub fn proofs(
        key: &ClusterKey,
        client: &str,
        server: &str,
        nonce_c: [u8; NONCE_LEN],
        nonce_s: [u8; NONCE_LEN],
        flags: u8,
    ) -> (Vec<u8>, Vec<u8>) {
        let t = Transcript {
            nonce_c,
            nonce_s,
            client: client.to_string(),
            server: server.to_string(),
            flags,
        };
        (key.proof(CLIENT_LABEL, &t), key.proof(SERVER_LABEL, &t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn key(bytes: &[u8]) -> ClusterKey {
        ClusterKey::from_bytes(bytes).unwrap()
    }

    fn node(text: &str) -> NodeId {
        text.parse().unwrap()
    }

    /// Runs `server` on one end of a loopback connection and returns the client end.
    fn pair<T: Send + 'static>(
        server: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> (TcpStream, thread::JoinHandle<T>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = thread::spawn(move || server(listener.accept().unwrap().0));
        (TcpStream::connect(addr).unwrap(), handle)
    }

    type Accepted = Result<(NodeId, Session), AuthError>;

    fn serve(k: ClusterKey, me: &'static str) -> (TcpStream, thread::JoinHandle<Accepted>) {
        pair(move |s| server_handshake(&s, &node(me), &k, false, HANDSHAKE_TIMEOUT))
    }

    #[test]
    fn keys_load_from_hex_or_raw_bytes() {
        assert!(ClusterKey::from_bytes(format!("  {}\n", "ab".repeat(32)).as_bytes()).is_ok());
        assert!(ClusterKey::from_bytes(&[7u8; 32]).is_ok());
        assert!(matches!(
            ClusterKey::from_bytes(b"short\n"),
            Err(KeyError::TooShort { len: 5 })
        ));
        assert!(matches!(
            ClusterKey::from_bytes(&[b' '; 40]),
            Err(KeyError::TooShort { len: 0 })
        ));
        // 62 hex characters are raw bytes (31 of them would be too few as hex): still >= 32.
        assert!(ClusterKey::from_bytes("ab".repeat(31).as_bytes()).is_ok());
        assert!(matches!(
            ClusterKey::from_bytes(&[b'a'; 31]),
            Err(KeyError::TooShort { .. })
        ));
        // Hex and the same text as raw bytes are different keys.
        let hex_text = "ab".repeat(32);
        let t = Transcript {
            nonce_c: [1; 32],
            nonce_s: [2; 32],
            client: "a".into(),
            server: "b".into(),
            flags: 0,
        };
        let as_hex = key(hex_text.as_bytes());
        let raw = key(&[0xab; 32]);
        assert_eq!(as_hex.proof(CLIENT_LABEL, &t), raw.proof(CLIENT_LABEL, &t));
        assert_ne!(
            key(KEY).proof(CLIENT_LABEL, &t),
            raw.proof(CLIENT_LABEL, &t)
        );
    }

    #[test]
    fn key_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, KEY).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ClusterKey::from_file(&path).is_ok());
        std::fs::write(&path, vec![b'x'; MAX_KEY_FILE as usize + 1]).unwrap();
        assert!(matches!(
            ClusterKey::from_file(&path),
            Err(KeyError::TooLarge { .. })
        ));
        assert!(matches!(
            ClusterKey::from_file(&dir.path().join("none")),
            Err(KeyError::Read { .. })
        ));
        assert_eq!(format!("{:?}", key(KEY)), "ClusterKey(..)");
    }

    #[test]
    fn key_files_others_can_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, KEY).unwrap();
        for mode in [0o640, 0o604, 0o660, 0o644, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = ClusterKey::from_file(&path).unwrap_err();
            assert!(
                matches!(err, KeyError::Exposed { mode: m, .. } if m == mode),
                "{err}"
            );
            let text = err.to_string();
            let mode_text = format!("{mode:04o}");
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains(&mode_text), "{text}");
            assert!(text.contains("chmod 600"), "{text}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(ClusterKey::from_file(&path).is_ok());
        }
    }

    #[test]
    fn same_key_authenticates_both_ways_and_agrees_on_session_keys() {
        let (client, server) = serve(key(KEY), "b");
        let mut c = client_handshake(
            &client,
            &node("a"),
            &node("b"),
            &key(KEY),
            false,
            HANDSHAKE_TIMEOUT,
        )
        .unwrap();
        let (peer, mut s) = server.join().unwrap().unwrap();
        assert_eq!(peer, node("a"));
        // Each direction has its own key: a frame checks only the way it was sent.
        let to_server = c.sealer.tag(&[b"request"]);
        assert!(!c.opener.clone().check(&[b"request"], &to_server));
        assert!(s.opener.check(&[b"request"], &to_server));
        let to_client = s.sealer.tag(&[b"answer"]);
        assert!(c.opener.check(&[b"answer"], &to_client));

        // A second connection between the same nodes gets other keys (fresh nonces).
        let (client, server) = serve(key(KEY), "b");
        let mut again = client_handshake(
            &client,
            &node("a"),
            &node("b"),
            &key(KEY),
            false,
            HANDSHAKE_TIMEOUT,
        )
        .unwrap();
        server.join().unwrap().unwrap();
        let first = again.sealer.tag(&[b"request"]);
        assert!(!s.opener.clone().check(&[b"request"], &first));
        assert!(!Opener::new(&[0; SESSION_KEY_LEN]).check(&[b"request"], &first));
    }

    #[test]
    fn encryption_is_agreed_and_covered_by_the_proofs() {
        let k = key(KEY);
        let (client, server) =
            pair(move |s| server_handshake(&s, &node("b"), &k, true, HANDSHAKE_TIMEOUT));
        let mut c = client_handshake(
            &client,
            &node("a"),
            &node("b"),
            &key(KEY),
            true,
            HANDSHAKE_TIMEOUT,
        )
        .unwrap();
        let (_, mut s) = server.join().unwrap().unwrap();
        assert!(c.sealer.encrypts() && s.opener.decrypts());
        let mut payload = *b"secret";
        let tag = c.sealer.encrypt(&[0; 24], &mut payload);
        assert_ne!(&payload, b"secret");
        assert!(s.opener.decrypt(&[0; 24], &mut payload, &tag));
        assert_eq!(&payload, b"secret");

        // The flags are in the transcript: the same handshake with other flags proves nothing.
        let t = |flags| Transcript {
            nonce_c: [1; 32],
            nonce_s: [2; 32],
            client: "a".into(),
            server: "b".into(),
            flags,
        };
        let k = key(KEY);
        assert_ne!(k.proof(CLIENT_LABEL, &t(0)), k.proof(CLIENT_LABEL, &t(1)));

        let k = key(KEY);
        let (client, server) =
            pair(move |s| server_handshake(&s, &node("b"), &k, true, HANDSHAKE_TIMEOUT));
        let err = client_handshake(
            &client,
            &node("a"),
            &node("b"),
            &key(KEY),
            false,
            HANDSHAKE_TIMEOUT,
        )
        .unwrap_err();
        assert!(
            matches!(err, AuthError::Refused(ref r) if r.contains("--peer-encrypt on") && r.contains("--peer-encrypt off")),
            "{err}"
        );
        assert!(matches!(
            server.join().unwrap(),
            Err(AuthError::EncryptMismatch {
                server: true,
                client: false
            })
        ));
    }

    #[test]
    fn wrong_key_is_refused() {
        let (client, server) = serve(key(&[0x55; 32]), "b");
        let err = client_handshake(
            &client,
            &node("a"),
            &node("b"),
            &key(KEY),
            false,
            HANDSHAKE_TIMEOUT,
        )
        .unwrap_err();
        assert!(
            matches!(err, AuthError::Refused(ref r) if r == "authentication failed"),
            "{err}"
        );
        assert!(matches!(server.join().unwrap(), Err(AuthError::BadProof)));
    }

    #[test]
    fn wrong_node_id_is_refused_after_authentication() {
        let (client, server) = serve(key(KEY), "c");
        let err = client_handshake(
            &client,
            &node("a"),
            &node("b"),
            &key(KEY),
            false,
            HANDSHAKE_TIMEOUT,
        )
        .unwrap_err();
        assert!(
            matches!(err, AuthError::Refused(ref r) if r.contains("'b'") && r.contains("'c'")),
            "{err}"
        );
        assert!(matches!(
            server.join().unwrap(),
            Err(AuthError::WrongNode { .. })
        ));
    }

    #[test]
    fn client_checks_the_servers_proof() {
        // A server that plays along without the key: its Accept carries a made-up proof.
        let (client, server) = pair(|s| {
            let mut t = Timed {
                stream: &s,
                deadline: Instant::now() + HANDSHAKE_TIMEOUT,
            };
            read_preamble(&mut t).unwrap();
            t.write_all(&preamble()).unwrap();
            receive(&mut t, Kind::Hello).unwrap();
            send(&mut t, Kind::Challenge, &[0; NONCE_LEN]).unwrap();
            receive(&mut t, Kind::Proof).unwrap();
            send(&mut t, Kind::Accept, &[0; MAC_LEN]).unwrap();
        });
        let err = client_handshake(
            &client,
            &node("a"),
            &node("b"),
            &key(KEY),
            false,
            HANDSHAKE_TIMEOUT,
        )
        .unwrap_err();
        assert!(matches!(err, AuthError::BadProof), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn version_mismatch_is_clear_on_both_sides() {
        let (mut raw, server) = serve(key(KEY), "b");
        let mut old = preamble();
        old[MAGIC.len()] = 1;
        raw.write_all(&old).unwrap();
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, preamble());
        assert!(matches!(
            server.join().unwrap(),
            Err(AuthError::Version {
                ours: VERSION,
                theirs: 1
            })
        ));

        let (client, server) = pair(|mut s| {
            let mut old = preamble();
            old[MAGIC.len()] = 7;
            s.write_all(&old).unwrap();
        });
        let err = client_handshake(
            &client,
            &node("a"),
            &node("b"),
            &key(KEY),
            false,
            HANDSHAKE_TIMEOUT,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                AuthError::Version {
                    ours: VERSION,
                    theirs: 7
                }
            ),
            "{err}"
        );
        server.join().unwrap();
    }

    #[test]
    fn strangers_learn_nothing() {
        // Wrong magic: the server answers nothing at all and closes.
        let (mut raw, server) = serve(key(KEY), "b");
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut reply = Vec::new();
        // Closed with our bytes unread, the kernel may answer with a reset instead of a FIN.
        let _ = raw.read_to_end(&mut reply);
        assert!(reply.is_empty());
        assert!(matches!(server.join().unwrap(), Err(AuthError::BadMagic)));
    }

    #[test]
    fn oversize_and_silent_handshakes_end() {
        let (mut raw, server) = serve(key(KEY), "b");
        raw.write_all(&preamble()).unwrap();
        raw.write_all(&frame::encode(Kind::Hello, 0, &[0; MAX_HANDSHAKE_PAYLOAD + 1]).unwrap())
            .unwrap();
        assert!(matches!(
            server.join().unwrap(),
            Err(AuthError::Frame(FrameError::TooLong { .. }))
        ));

        let (_raw, server) = pair(|s| {
            server_handshake(&s, &node("b"), &key(KEY), false, Duration::from_millis(100))
        });
        let started = Instant::now();
        assert!(matches!(server.join().unwrap(), Err(AuthError::Io(_))));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn hello_parsing_is_strict() {
        let good = hello_payload("a", "b", &[3; 32], 0);
        let (c, s, n, f) = parse_hello(&good).unwrap();
        assert_eq!((c, s, n, f), (node("a"), node("b"), [3; 32], 0));
        let on = hello_payload("a", "b", &[3; 32], FLAG_ENCRYPT);
        assert_eq!(parse_hello(&on).unwrap().3, FLAG_ENCRYPT);
        assert!(matches!(
            parse_hello(&hello_payload("a", "b", &[3; 32], 2)),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            parse_hello(&good[..good.len() - 1]),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            parse_hello(&[good.clone(), vec![0]].concat()),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            parse_hello(&hello_payload("../x", "b", &[0; 32], 0)),
            Err(AuthError::BadNodeId(_))
        ));
        assert!(matches!(parse_hello(&[200]), Err(AuthError::Malformed(_))));
    }
}
