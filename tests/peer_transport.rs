//! The peer transport over loopback: a real server and real clients on 127.0.0.1 with
//! ephemeral ports, and a toy in-memory handler.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cormorant::image::{BlockRange, NodeId, Tier};
use cormorant::peer::auth::{self, HANDSHAKE_TIMEOUT};
use cormorant::peer::client::{batch, with_landing, Landing};
use cormorant::peer::frame::{self, Decoder, Kind, HEADER_LEN, MAX_PAYLOAD};
use cormorant::peer::message::MAX_CHUNK;
use cormorant::peer::seal::{Session, TAG_LEN};
use cormorant::peer::server::{MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDRESS};
use cormorant::peer::{
    code, ClusterKey, ImageRef, PeerClient, PeerError, PeerHandler, PeerServer, Request, Response,
};

const KEY: &[u8] = b"f00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeed\n";
const WAIT: Duration = Duration::from_secs(5);

fn key() -> ClusterKey {
    ClusterKey::from_bytes(KEY).unwrap()
}

fn node(id: &str) -> NodeId {
    id.parse().unwrap()
}

fn image() -> ImageRef {
    ImageRef::new("disk0".parse().unwrap(), 1)
}

/// Bytes a toy read of `block` returns: they name the block, so a mixed-up answer shows.
fn block_bytes(block: u64, len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (block as u32).wrapping_mul(31).wrapping_add(i) as u8)
        .collect()
}

/// An in-memory node: reads answer `block_bytes` unless the block was written; each call
/// first sleeps a few milliseconds chosen from the block number (so answers overtake each
/// other, the same way every run); block 666 panics; blocks from 900 sleep `slow` ms; writes
/// wait while `hold` is set.
#[derive(Default)]
struct Toy {
    calls: AtomicUsize,
    slow: u64,
    hold: AtomicBool,
    written: Mutex<HashMap<u64, Vec<u8>>>,
}

impl PeerHandler for Toy {
    fn handle(&self, from: &NodeId, request: Request) -> Response {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match request {
            Request::Read { block, len, .. } => {
                let pause = if block >= 900 {
                    self.slow
                } else {
                    block.wrapping_mul(7919) % 5
                };
                thread::sleep(Duration::from_millis(pause));
                assert_ne!(block, 666, "the toy handler panics on block 666");
                let written = self.written.lock().unwrap().get(&block).cloned();
                Response::Data(written.unwrap_or_else(|| block_bytes(block, len)))
            }
            Request::Write { block, data, .. } => {
                while self.hold.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(1));
                }
                self.written.lock().unwrap().insert(block, data);
                Response::Ok
            }
            Request::Checksums { blocks, .. } => Response::Checksums(
                blocks
                    .iter()
                    .map(|b| (b % 2 == 0).then_some([b as u8; 32]))
                    .collect(),
            ),
            Request::Meta { .. } => {
                Response::MetaJson(format!("{{\"asked_by\":\"{from}\"}}").into_bytes())
            }
            Request::Flush { .. } => Response::Ok,
            _ => Response::error(code::NOT_FOUND, "the toy holds nothing else"),
        }
    }
}

fn start(toy: &Arc<Toy>, addr: SocketAddr) -> PeerServer {
    let handler: Arc<dyn PeerHandler> = toy.clone();
    PeerServer::start(addr, key(), node("server"), handler).unwrap()
}

fn client(addr: SocketAddr, key: ClusterKey, pool: usize) -> PeerClient {
    PeerClient::new(node("client"), node("server"), addr, key, pool)
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn read(block: u64, len: u32) -> Request {
    Request::Read {
        image: image(),
        tier: Tier::Ram,
        block,
        offset: 0,
        len,
    }
}

#[test]
fn pipelined_calls_complete_once_with_their_own_answers() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let client = client(server.local_addr(), key(), 3);
    const CALLS: u64 = 600;
    let (tx, rx) = mpsc::channel();
    for block in 0..CALLS {
        let tx = tx.clone();
        let len = 1 + (block as u32 * 37) % 5000;
        client.call(
            read(block, len),
            Box::new(move |result| tx.send((block, len, result)).unwrap()),
        );
    }
    drop(tx);
    let mut seen = vec![false; CALLS as usize];
    let mut order = Vec::new();
    for _ in 0..CALLS {
        let (block, len, result) = rx.recv_timeout(WAIT).expect("every call completes");
        assert!(!seen[block as usize], "block {block} completed twice");
        seen[block as usize] = true;
        order.push(block);
        assert_eq!(result.unwrap(), Response::Data(block_bytes(block, len)));
    }
    // Every completion has been sent and the senders are gone: nothing completes twice.
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "answers came back in order"
    );
    assert_eq!(client.pending(), 0);
    assert_eq!(toy.calls.load(Ordering::SeqCst), CALLS as usize);
}

#[test]
fn every_request_kind_crosses_and_errors_are_refusals() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let client = client(server.local_addr(), key(), 1);
    let write = Request::Write {
        image: image(),
        tier: Tier::Volume,
        block: 5,
        offset: 0,
        data: vec![0xab; MAX_CHUNK as usize],
    };
    assert_eq!(client.call_wait(write, WAIT).unwrap(), Response::Ok);
    assert_eq!(
        client.call_wait(read(5, MAX_CHUNK), WAIT).unwrap(),
        Response::Data(vec![0xab; MAX_CHUNK as usize])
    );
    let blocks = BlockRange::new(4, 7).unwrap();
    let sums = client.call_wait(
        Request::Checksums {
            image: image(),
            tier: Tier::Ram,
            blocks,
        },
        WAIT,
    );
    assert_eq!(
        sums.unwrap(),
        Response::Checksums(vec![Some([4; 32]), None, Some([6; 32])])
    );
    let meta = client
        .call_wait(Request::Meta { image: image() }, WAIT)
        .unwrap();
    assert_eq!(
        meta,
        Response::MetaJson(b"{\"asked_by\":\"client\"}".to_vec())
    );
    assert_eq!(
        client
            .call_wait(Request::Flush { image: image() }, WAIT)
            .unwrap(),
        Response::Ok
    );
    let release = Request::Release {
        image: image(),
        tier: Tier::Ram,
        blocks,
    };
    assert!(matches!(
        client.call_wait(release, WAIT),
        Err(PeerError::Refused {
            code: code::NOT_FOUND,
            ..
        })
    ));
    // A panicking handler is answered, and the connection carries on.
    let panicked = client.call_wait(read(666, 10), WAIT);
    assert!(
        matches!(
            panicked,
            Err(PeerError::Refused {
                code: code::INTERNAL,
                ..
            })
        ),
        "{panicked:?}"
    );
    assert!(client.call_wait(read(1, 10), WAIT).is_ok());
    // A request over the limits is refused before it is sent.
    let big = Request::Write {
        image: image(),
        tier: Tier::Ram,
        block: 0,
        offset: 0,
        data: vec![0; MAX_CHUNK as usize + 1],
    };
    assert!(matches!(
        client.call_wait(big, WAIT),
        Err(PeerError::BadRequest(_))
    ));
}

#[test]
fn a_wrong_key_is_refused_before_any_request() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let other = ClusterKey::from_bytes(&[0x42; 32]).unwrap();
    let stranger = client(server.local_addr(), other, 2);
    let result = stranger.call_wait(Request::Flush { image: image() }, WAIT);
    assert!(matches!(result, Err(PeerError::Auth(_))), "{result:?}");
    // Backing off: the next call fails at once, with the same reason.
    let started = Instant::now();
    assert!(matches!(
        stranger.call_wait(read(1, 1), WAIT),
        Err(PeerError::Auth(_))
    ));
    assert!(started.elapsed() < Duration::from_millis(100));
    // Calling the server by another node's name fails the same way.
    let confused = PeerClient::new(
        node("client"),
        node("elsewhere"),
        server.local_addr(),
        key(),
        1,
    );
    assert!(matches!(
        confused.call_wait(read(1, 1), WAIT),
        Err(PeerError::Auth(_))
    ));
    assert_eq!(toy.calls.load(Ordering::SeqCst), 0);
}

/// Opens a raw connection that has passed the handshake, with its session keys.
fn authenticated(addr: SocketAddr) -> (TcpStream, Session) {
    let stream = TcpStream::connect(addr).unwrap();
    let session = auth::client_handshake(
        &stream,
        &node("raw"),
        &node("server"),
        &key(),
        false,
        HANDSHAKE_TIMEOUT,
    )
    .unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    (stream, session)
}

/// True when the server closes `stream` (end of file or reset) before `WAIT`.
fn closed_by_server(stream: TcpStream) -> bool {
    closed_within(stream, WAIT)
}

/// True when the server closes `stream` (end of file or reset) within `wait`.
fn closed_within(mut stream: TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn garbage_closes_only_its_own_connection() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let addr = server.local_addr();
    let good = client(addr, key(), 1);
    assert!(good.call_wait(read(1, 8), WAIT).is_ok());

    // Random bytes instead of a handshake.
    let mut noise = TcpStream::connect(addr).unwrap();
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = noise.write_all(&bytes);
    assert!(closed_by_server(noise));

    // After a good handshake: an oversize length, a bad checksum, a response kind.
    let (mut oversize, _) = authenticated(addr);
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    header[4] = Kind::Write as u8;
    oversize.write_all(&header).unwrap();
    assert!(closed_by_server(oversize));

    let (mut bad_crc, mut session) = authenticated(addr);
    let mut frame =
        frame::encode_sealed(Kind::Flush, 1, b"\x05disk0", &mut session.sealer).unwrap();
    frame[16] ^= 0xff;
    bad_crc.write_all(&frame).unwrap();
    assert!(closed_by_server(bad_crc));

    let (mut wrong_way, mut session) = authenticated(addr);
    wrong_way
        .write_all(&frame::encode_sealed(Kind::Ok, 1, b"", &mut session.sealer).unwrap())
        .unwrap();
    assert!(closed_by_server(wrong_way));

    // A sound frame whose payload is not a request is answered, and the connection stays.
    let (mut sloppy, mut session) = authenticated(addr);
    sloppy
        .write_all(
            &frame::encode_sealed(Kind::Flush, 7, b"\x05../x0", &mut session.sealer).unwrap(),
        )
        .unwrap();
    let mut answers = Decoder::sealed(MAX_PAYLOAD, session.opener);
    let answer = answers.read_from(&mut sloppy).unwrap().unwrap();
    assert_eq!((answer.kind, answer.id), (Kind::Error, 7));
    assert_eq!(
        u16::from_le_bytes([answer.payload[0], answer.payload[1]]),
        code::BAD_REQUEST
    );
    sloppy
        .write_all(
            &frame::encode_sealed(
                Kind::Flush,
                8,
                b"\x05disk0\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
                &mut session.sealer,
            )
            .unwrap(),
        )
        .unwrap();
    let answer = answers.read_from(&mut sloppy).unwrap().unwrap();
    assert_eq!((answer.kind, answer.id), (Kind::Ok, 8));

    assert!(good.call_wait(read(2, 8), WAIT).is_ok());
    assert_eq!(toy.calls.load(Ordering::SeqCst), 3);
}

#[test]
fn a_hung_peer_times_calls_out_and_the_connection_lives_on() {
    let toy = Arc::new(Toy {
        slow: 400,
        ..Toy::default()
    });
    let server = start(&toy, any_port());
    let timeout = Duration::from_millis(100);
    let client = client(server.local_addr(), key(), 1).with_request_timeout(timeout);
    assert!(client.call_wait(read(1, 1), WAIT).is_ok());
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    client.call(
        read(900, 1),
        Box::new(move |result| tx.send(result).unwrap()),
    );
    assert_eq!(
        rx.recv_timeout(WAIT).unwrap(),
        Err(PeerError::Timeout(timeout))
    );
    assert!(started.elapsed() < Duration::from_millis(350));
    // A call's own timeout wins over the client's.
    let (tx, rx) = mpsc::channel();
    let patient = Duration::from_secs(2);
    client.call_with_timeout(
        read(902, 1),
        patient,
        Box::new(move |r| tx.send(r).unwrap()),
    );
    assert_eq!(
        rx.recv_timeout(WAIT).unwrap(),
        Ok(Response::Data(block_bytes(902, 1)))
    );
    // call_wait's own timeout is the call's.
    let short = Duration::from_millis(60);
    assert_eq!(
        client.call_wait(read(901, 1), short),
        Err(PeerError::Timeout(short))
    );
    assert_eq!(client.pending(), 0);
    assert!(client.call_wait(read(1, 1), WAIT).is_ok());
}

#[test]
fn losing_the_server_fails_pending_calls_and_the_client_reconnects() {
    let toy = Arc::new(Toy {
        slow: 300,
        ..Toy::default()
    });
    let server = start(&toy, any_port());
    let addr = server.local_addr();
    let client = client(addr, key(), 2);
    assert!(client.call_wait(read(1, 1), WAIT).is_ok());

    let (tx, rx) = mpsc::channel();
    for block in 900..910 {
        let tx = tx.clone();
        client.call(
            read(block, 1),
            Box::new(move |result| tx.send(result).unwrap()),
        );
    }
    drop(tx);
    thread::sleep(Duration::from_millis(50));
    server.stop();
    let failures: Vec<_> = (0..10).map(|_| rx.recv_timeout(WAIT).unwrap()).collect();
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "a call completed twice"
    );
    for failure in failures {
        assert!(
            matches!(failure, Err(PeerError::Unavailable(_))),
            "{failure:?}"
        );
    }

    // While the server is down, calls fail quickly, and say so.
    for _ in 0..3 {
        let started = Instant::now();
        let result = client.call_wait(read(1, 1), WAIT);
        assert!(
            matches!(result, Err(ref e) if e.is_unreachable()),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    let again = start(&toy, addr);
    let deadline = Instant::now() + WAIT;
    loop {
        match client.call_wait(read(3, 4), WAIT) {
            Ok(answer) => break assert_eq!(answer, Response::Data(block_bytes(3, 4))),
            Err(e) if Instant::now() < deadline => {
                assert!(e.is_unreachable(), "{e}");
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("no reconnection: {e}"),
        }
    }
    drop(again);
}

#[test]
fn dropping_the_client_fails_what_is_pending() {
    let toy = Arc::new(Toy {
        slow: 300,
        ..Toy::default()
    });
    let server = start(&toy, any_port());
    let client = client(server.local_addr(), key(), 1);
    let (tx, rx) = mpsc::channel();
    client.call(
        read(900, 1),
        Box::new(move |result| tx.send(result).unwrap()),
    );
    thread::sleep(Duration::from_millis(50));
    drop(client);
    assert!(matches!(
        rx.recv_timeout(WAIT).unwrap(),
        Err(PeerError::Unavailable(_))
    ));
}

#[test]
fn a_busy_server_stops_reading_and_catches_up() {
    let toy = Arc::new(Toy::default());
    toy.hold.store(true, Ordering::SeqCst);
    let server = start(&toy, any_port());
    let (mut raw, mut session) = authenticated(server.local_addr());
    raw.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // name, epoch, stamp, tier, block, offset, data
    let payload = [
        &b"\x05disk0"[..],
        &[0; 16],
        &[0],
        &[0; 12],
        &vec![7; MAX_CHUNK as usize],
    ]
    .concat();
    // Write requests go out until the socket stops taking them: the server has stopped
    // reading (at most 64 requests or 32 MiB in flight, plus what the kernel buffers).
    let (mut sent, mut partial) = (0u64, None);
    while sent < 200 {
        let frame =
            frame::encode_sealed(Kind::Write, sent + 1, &payload, &mut session.sealer).unwrap();
        let mut at = 0;
        while at < frame.len() {
            match raw.write(&frame[at..]) {
                Ok(n) => at += n,
                Err(_) => break,
            }
        }
        if at < frame.len() {
            partial = Some((frame, at));
            break;
        }
        sent += 1;
    }
    assert!(
        sent < 100,
        "the server read {sent} MiB of requests it could not handle yet"
    );
    assert!(
        toy.calls.load(Ordering::SeqCst) <= 4,
        "only the workers hold requests"
    );
    toy.hold.store(false, Ordering::SeqCst);
    raw.set_write_timeout(Some(WAIT)).unwrap();
    if let Some((frame, at)) = partial {
        raw.write_all(&frame[at..]).unwrap();
        sent += 1;
    }
    let mut ids = Vec::new();
    for _ in 0..sent {
        let mut header = [0u8; HEADER_LEN + TAG_LEN];
        raw.read_exact(&mut header).unwrap();
        assert_eq!((header[4], &header[0..4]), (Kind::Ok as u8, &[0u8; 4][..]));
        ids.push(u64::from_le_bytes(header[8..16].try_into().unwrap()));
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=sent).collect::<Vec<_>>());
}

/// A TCP connection to `to` (an IPv4 loopback address) from the loopback address `from`, so
/// one test can be several hosts.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let sockaddr = |addr: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let (local, remote) = (sockaddr(SocketAddrV4::new(from, 0)), sockaddr(to));
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket(2) takes no pointers; the descriptor is checked, then owned by the
    // TcpStream, which closes it.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    // SAFETY: bind(2) and connect(2) on our open socket with pointers to local sockaddr_in
    // values and their true length.
    unsafe {
        let bound = libc::bind(fd, (&raw const local).cast(), len);
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        let connected = libc::connect(fd, (&raw const remote).cast(), len);
        assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
    }
    stream
}

fn loopback(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

#[test]
fn handshakes_in_progress_are_bounded() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let addr = server.local_addr();
    // From several addresses, so that the per-address cap is not what stops them.
    let silent: Vec<TcpStream> = (0..MAX_HANDSHAKES)
        .map(|i| connect_from(loopback(10 + (i / MAX_HANDSHAKES_PER_ADDRESS) as u8), addr))
        .collect();
    // Wait until the server has taken them all in.
    thread::sleep(Duration::from_millis(100));
    assert!(closed_by_server(connect_from(loopback(99), addr)));
    drop(silent);
    let good = client(addr, key(), 1);
    let deadline = Instant::now() + WAIT;
    while let Err(e) = good.call_wait(read(1, 1), WAIT) {
        assert!(e.is_unreachable() && Instant::now() < deadline, "{e}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_handshakes_from_one_address_lock_no_one_else_out_and_expire() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let addr = server.local_addr();
    let flooder = loopback(2);
    let started = Instant::now();
    let idle: Vec<TcpStream> = (0..2 * MAX_HANDSHAKES)
        .map(|_| connect_from(flooder, addr))
        .collect();
    // One that trickles its preamble, a byte at a time, to stretch the handshake out.
    let trickle = thread::spawn(move || {
        let mut stream = connect_from(loopback(3), addr);
        let began = Instant::now();
        for byte in b"CORMORANT\x02\x00" {
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(400));
        }
        let closed = closed_within(stream, HANDSHAKE_TIMEOUT + Duration::from_secs(2));
        (closed, began.elapsed())
    });
    thread::sleep(Duration::from_millis(100));
    // A peer at another address gets through at once, first try.
    let good = client(addr, key(), 1);
    assert_eq!(
        good.call_wait(read(1, 4), WAIT).unwrap(),
        Response::Data(block_bytes(1, 4))
    );
    // The flooder holds MAX_HANDSHAKES_PER_ADDRESS slots; the rest were closed at once.
    let mut idle = idle.into_iter();
    let held: Vec<TcpStream> = idle.by_ref().take(MAX_HANDSHAKES_PER_ADDRESS).collect();
    for extra in idle {
        let kept = !closed_within(extra, Duration::from_millis(500));
        assert!(!kept, "an extra idle connection from one address was kept");
    }
    // The ones it holds are dropped once the handshake deadline passes.
    let grace = HANDSHAKE_TIMEOUT + Duration::from_secs(2);
    for stream in held {
        assert!(
            closed_within(stream, grace),
            "an idle handshake outlived its deadline"
        );
    }
    assert!(started.elapsed() < grace);
    let (closed, after) = trickle.join().unwrap();
    assert!(closed, "the trickling handshake was not closed");
    assert!(
        after < HANDSHAKE_TIMEOUT + Duration::from_secs(1),
        "a trickling handshake lived {after:?}"
    );
}

/// Frames that only carry a CRC, as an on-path host can forge them, and sealed frames sent
/// again, out of order or after one was left out: each closes the connection unanswered.
#[test]
fn frames_without_a_good_tag_close_the_connection() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let addr = server.local_addr();
    let flush = |id| {
        Request::Flush { image: image() }
            .encode()
            .unwrap()
            .into_frame(id)
            .unwrap()
    };

    // The connection works with sealed frames.
    let (mut ok, mut session) = authenticated(addr);
    ok.write_all(&flush(1).to_sealed_bytes(&mut session.sealer))
        .unwrap();
    let mut answers = Decoder::sealed(MAX_PAYLOAD, session.opener.clone());
    assert_eq!(answers.read_from(&mut ok).unwrap().unwrap().kind, Kind::Ok);
    assert_eq!(toy.calls.load(Ordering::SeqCst), 1);

    // Injected: a sound frame with a good CRC and a made-up tag.
    let (mut injected, _) = authenticated(addr);
    injected
        .write_all(&[flush(1).to_bytes(), vec![0; TAG_LEN]].concat())
        .unwrap();
    assert!(closed_by_server(injected));

    // Replayed: the same sealed frame twice.
    let (mut replayed, mut session) = authenticated(addr);
    let once = flush(1).to_sealed_bytes(&mut session.sealer);
    replayed.write_all(&[once.clone(), once].concat()).unwrap();
    assert!(closed_by_server(replayed));

    // Reordered, or one left out: the second frame sent first.
    let (mut reordered, mut session) = authenticated(addr);
    let first = flush(1).to_sealed_bytes(&mut session.sealer);
    let second = flush(2).to_sealed_bytes(&mut session.sealer);
    reordered.write_all(&[second, first].concat()).unwrap();
    assert!(closed_by_server(reordered));

    // Sealed with another connection's keys.
    let (_, mut other) = authenticated(addr);
    let (mut crossed, _) = authenticated(addr);
    crossed
        .write_all(&flush(1).to_sealed_bytes(&mut other.sealer))
        .unwrap();
    assert!(closed_by_server(crossed));

    // Only the frame on `ok` and the first of `replayed` may have got through (that one may
    // also be dropped unhandled when its connection closes).
    assert!(toy.calls.load(Ordering::SeqCst) <= 2);
}

/// A host between two nodes that changes a write's data on the way and fixes the CRC up:
/// without tags the server would store the altered bytes. Now it closes the connection, the
/// write is never carried out and the call fails.
#[test]
fn a_write_altered_on_the_way_is_refused() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let proxy = std::net::TcpListener::bind(any_port()).unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let upstream = server.local_addr();
    let on_path = thread::spawn(move || {
        let (mut from_client, _) = proxy.accept().unwrap();
        let mut to_server = TcpStream::connect(upstream).unwrap();
        let mut back = to_server.try_clone().unwrap();
        let mut to_client = from_client.try_clone().unwrap();
        thread::spawn(move || {
            let _ = std::io::copy(&mut back, &mut to_client);
            let _ = to_client.shutdown(std::net::Shutdown::Both);
        });
        let mut preamble = [0u8; 11];
        from_client.read_exact(&mut preamble).unwrap();
        to_server.write_all(&preamble).unwrap();
        // Hello and Proof pass untouched; the next frame is the write.
        for frame in 0..3 {
            let mut header = [0u8; HEADER_LEN];
            from_client.read_exact(&mut header).unwrap();
            let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; len];
            from_client.read_exact(&mut payload).unwrap();
            if frame == 2 {
                assert_eq!(header[4], Kind::Write as u8);
                *payload.last_mut().unwrap() ^= 0xff;
                let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..16]), &payload);
                header[16..20].copy_from_slice(&crc.to_le_bytes());
            }
            to_server
                .write_all(&[&header[..], &payload].concat())
                .unwrap();
        }
        let _ = std::io::copy(&mut from_client, &mut to_server);
    });
    let client = client(proxy_addr, key(), 1);
    let write = Request::Write {
        image: image(),
        tier: Tier::Ram,
        block: 9,
        offset: 0,
        data: vec![0x5a; 4096],
    };
    let result = client.call_wait(write, WAIT);
    assert!(
        matches!(result, Err(PeerError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        toy.written.lock().unwrap().get(&9).is_none(),
        "the altered write was carried out"
    );
    drop(client);
    let _ = on_path.join();
}

/// A TCP forwarder to `target` that keeps a copy of every byte it passes, both ways.
fn recording_forwarder(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = std::net::TcpListener::bind(any_port()).unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
    let record = seen.clone();
    thread::spawn(move || {
        for from_client in listener.incoming().flatten() {
            let Ok(to_server) = TcpStream::connect(target) else {
                continue;
            };
            for (mut from, mut to) in [
                (
                    from_client.try_clone().unwrap(),
                    to_server.try_clone().unwrap(),
                ),
                (to_server, from_client),
            ] {
                let record = record.clone();
                thread::spawn(move || {
                    let mut buf = [0u8; 64 << 10];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (addr, seen)
}

/// What the test writes: easy to find on the wire if it goes in the clear.
const PATTERN: &[u8] = b"<<plaintext pattern 7f3a>>";

/// Writes a block of `PATTERN`s through a recording forwarder and reads it (and an unwritten
/// block) back, with `--peer-encrypt` on both sides or on neither; returns the wire's bytes.
fn write_and_read_through_forwarder(encrypt: bool) -> Vec<u8> {
    let toy = Arc::new(Toy::default());
    let handler: Arc<dyn PeerHandler> = toy.clone();
    let server =
        PeerServer::start_with_encryption(any_port(), key(), node("server"), handler, encrypt)
            .unwrap();
    let (addr, seen) = recording_forwarder(server.local_addr());
    let client = client(addr, key(), 1).with_encryption(encrypt);
    let data: Vec<u8> = PATTERN.iter().copied().cycle().take(4096).collect();
    let write = Request::Write {
        image: image(),
        tier: Tier::Ram,
        block: 9,
        offset: 0,
        data: data.clone(),
    };
    assert!(matches!(client.call_wait(write, WAIT), Ok(Response::Ok)));
    assert_eq!(toy.written.lock().unwrap().get(&9), Some(&data));
    match client.call_wait(read(9, 4096), WAIT) {
        Ok(Response::Data(bytes)) => assert_eq!(bytes, data),
        other => panic!("{other:?}"),
    }
    match client.call_wait(read(3, 1000), WAIT) {
        Ok(Response::Data(bytes)) => assert_eq!(bytes, block_bytes(3, 1000)),
        other => panic!("{other:?}"),
    }
    drop(client);
    let wire = seen.lock().unwrap().clone();
    // The write and the read's answer both crossed: more than two blocks' worth.
    assert!(wire.len() > 2 * 4096, "{} bytes on the wire", wire.len());
    wire
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn encrypted_peers_exchange_reads_and_writes_and_the_wire_shows_no_plaintext() {
    let wire = write_and_read_through_forwarder(true);
    assert!(
        !contains(&wire, PATTERN),
        "the written pattern crossed the wire in the clear"
    );
    // The forwarder does see plaintext when frames are only authenticated.
    let clear = write_and_read_through_forwarder(false);
    assert!(contains(&clear, PATTERN));
}

#[test]
fn peers_that_disagree_on_encryption_are_refused_naming_both_settings() {
    for server_encrypts in [true, false] {
        let toy = Arc::new(Toy::default());
        let handler: Arc<dyn PeerHandler> = toy.clone();
        let server = PeerServer::start_with_encryption(
            any_port(),
            key(),
            node("server"),
            handler,
            server_encrypts,
        )
        .unwrap();
        let client = client(server.local_addr(), key(), 1).with_encryption(!server_encrypts);
        let (server_says, client_says) = match server_encrypts {
            true => ("on", "off"),
            false => ("off", "on"),
        };
        match client.call_wait(read(1, 1), WAIT) {
            Err(PeerError::Auth(message)) => {
                assert!(message.contains("refused by the peer"), "{message}");
                let want = format!(
                    "this node (server) runs with --peer-encrypt {server_says}, the client with --peer-encrypt {client_says}"
                );
                assert!(message.contains(&want), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(toy.calls.load(Ordering::SeqCst), 0);
    }
}

/// Reads `len` bytes of `block` into `buf` through a landing; the call's answer.
fn landed_read(client: &PeerClient, block: u64, buf: &mut [u8]) -> Result<Response, PeerError> {
    let len = buf.len();
    // SAFETY: `buf` outlives the call (call_wait returns after the completion ran) and is not
    // touched meanwhile.
    let landing = unsafe { Landing::new([(buf.as_mut_ptr(), len)], len) };
    with_landing(landing, || client.call_wait(read(block, len as u32), WAIT))
}

#[test]
fn a_read_with_a_landing_is_decoded_into_the_callers_buffers() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let client = client(server.local_addr(), key(), 1);
    // Sizes around the connection's read buffer (64 KiB) and up to a whole chunk.
    for (block, len) in [
        (1u64, 4096usize),
        (2, 1),
        (3, 65_000),
        (4, 70_000),
        (5, MAX_CHUNK as usize),
    ] {
        let mut buf = vec![0xeeu8; len];
        let answer = landed_read(&client, block, &mut buf);
        assert_eq!(answer, Ok(Response::Ok), "block {block}");
        assert!(
            buf == block_bytes(block, len as u32),
            "block {block}: wrong bytes landed"
        );
    }
    // Two segments, and a landing of another length: answered as usual, buffers untouched.
    let (mut head, mut tail) = (vec![0u8; 100], vec![0u8; 3996]);
    let landing =
        unsafe { Landing::new([(head.as_mut_ptr(), 100), (tail.as_mut_ptr(), 3996)], 4096) };
    let answer = with_landing(landing, || client.call_wait(read(6, 4096), WAIT));
    assert_eq!(answer, Ok(Response::Ok));
    assert_eq!([head, tail].concat(), block_bytes(6, 4096));
    let mut other = vec![0u8; 10];
    let landing = unsafe { Landing::new([(other.as_mut_ptr(), 10)], 10) };
    let answer = with_landing(landing, || client.call_wait(read(7, 4096), WAIT));
    assert_eq!(answer, Ok(Response::Data(block_bytes(7, 4096))));
    assert_eq!(other, vec![0u8; 10]);
    // Landed reads mixed with plain ones and answered out of order.
    let (tx, rx) = mpsc::channel();
    let mut bufs: Vec<Vec<u8>> = (0..40).map(|_| vec![0u8; 4096]).collect();
    for (i, buf) in bufs.iter_mut().enumerate() {
        let tx = tx.clone();
        let done = Box::new(move |result| tx.send((i, result)).unwrap());
        if i % 2 == 0 {
            let landing = unsafe { Landing::new([(buf.as_mut_ptr(), 4096)], 4096) };
            with_landing(landing, || client.call(read(i as u64, 4096), done));
        } else {
            client.call(read(i as u64, 4096), done);
        }
    }
    for _ in 0..40 {
        let (i, result) = rx.recv_timeout(WAIT).unwrap();
        match (i % 2, result) {
            (0, Ok(Response::Ok)) => {}
            (1, Ok(Response::Data(data))) => assert_eq!(data, block_bytes(i as u64, 4096)),
            other => panic!("call {i}: {other:?}"),
        }
    }
    for (i, buf) in bufs.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        assert!(
            *buf == block_bytes(i as u64, 4096),
            "call {i}: wrong bytes landed"
        );
    }
}

/// A host between two nodes that changes the payload of the first read answer on its way
/// back and fixes the CRC up: the landed read fails (its tag does not check), it is never
/// reported done, and the connection closes.
#[test]
fn a_landed_read_altered_on_the_way_fails() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let proxy = std::net::TcpListener::bind(any_port()).unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let upstream = server.local_addr();
    let on_path = thread::spawn(move || {
        let (mut to_client, _) = proxy.accept().unwrap();
        let mut to_server = TcpStream::connect(upstream).unwrap();
        let mut from_server = to_server.try_clone().unwrap();
        let mut from_client = to_client.try_clone().unwrap();
        thread::spawn(move || {
            let _ = std::io::copy(&mut from_client, &mut to_server);
            let _ = to_server.shutdown(std::net::Shutdown::Both);
        });
        let mut preamble = [0u8; auth::PREAMBLE_LEN];
        from_server.read_exact(&mut preamble).unwrap();
        to_client.write_all(&preamble).unwrap();
        // Challenge and Accept pass untouched (no tags); then the read's answer and its tag.
        for frame in 0..3 {
            let mut header = [0u8; HEADER_LEN];
            from_server.read_exact(&mut header).unwrap();
            let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
            let tag = if frame == 2 { TAG_LEN } else { 0 };
            let mut payload = vec![0u8; len + tag];
            from_server.read_exact(&mut payload).unwrap();
            if frame == 2 {
                assert_eq!(header[4], Kind::Data as u8);
                payload[0] ^= 0xff;
                let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..16]), &payload[..len]);
                header[16..20].copy_from_slice(&crc.to_le_bytes());
            }
            to_client
                .write_all(&[&header[..], &payload].concat())
                .unwrap();
        }
        let _ = std::io::copy(&mut from_server, &mut to_client);
    });
    let client = client(proxy_addr, key(), 1);
    let mut buf = vec![0u8; 4096];
    let answer = landed_read(&client, 5, &mut buf);
    assert!(matches!(answer, Err(PeerError::Protocol(_))), "{answer:?}");
    drop(client);
    let _ = on_path.join();
}

/// A toy that answers reads of even blocks inline (on the server's reader thread) and hands
/// everything else to the workers, which take a few milliseconds.
struct Mixed {
    inline: AtomicUsize,
    toy: Toy,
}

impl PeerHandler for Mixed {
    fn handle(&self, from: &NodeId, request: Request) -> Response {
        self.toy.handle(from, request)
    }

    fn handle_inline(&self, _from: &NodeId, request: Request) -> Result<Response, Request> {
        match request {
            Request::Read { block, len, .. } if block % 2 == 0 => {
                self.inline.fetch_add(1, Ordering::SeqCst);
                assert_ne!(block, 444, "the mixed handler panics inline on block 444");
                Ok(Response::Data(block_bytes(block, len)))
            }
            other => Err(other),
        }
    }
}

#[test]
fn inline_answers_interleave_with_worker_answers() {
    let mixed = Arc::new(Mixed {
        inline: AtomicUsize::new(0),
        toy: Toy::default(),
    });
    let handler: Arc<dyn PeerHandler> = mixed.clone();
    let server = PeerServer::start(any_port(), key(), node("server"), handler).unwrap();
    let client = client(server.local_addr(), key(), 1);
    const CALLS: u64 = 300;
    let (tx, rx) = mpsc::channel();
    for block in 0..CALLS {
        let tx = tx.clone();
        client.call(
            read(block, 512),
            Box::new(move |result| tx.send((block, result)).unwrap()),
        );
    }
    let mut seen = vec![false; CALLS as usize];
    for _ in 0..CALLS {
        let (block, result) = rx.recv_timeout(WAIT).expect("every call completes");
        assert!(!std::mem::replace(&mut seen[block as usize], true));
        assert_eq!(result.unwrap(), Response::Data(block_bytes(block, 512)));
    }
    assert_eq!(mixed.inline.load(Ordering::SeqCst), CALLS as usize / 2);
    assert_eq!(mixed.toy.calls.load(Ordering::SeqCst), CALLS as usize / 2);
    // A panic inline is answered like one on a worker, and the connection lives on.
    match client.call_wait(read(444, 8), WAIT) {
        Err(PeerError::Refused { code: c, .. }) => assert_eq!(c, code::INTERNAL),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client.call_wait(read(3, 8), WAIT),
        Ok(Response::Data(block_bytes(3, 8)))
    );
}

#[test]
fn calls_made_in_a_batch_leave_when_it_ends_and_all_complete() {
    let toy = Arc::new(Toy::default());
    let server = start(&toy, any_port());
    let client = client(server.local_addr(), key(), 2);
    let (tx, rx) = mpsc::channel();
    // Small reads, and writes adding up to more than a batch stages before writing.
    batch(|| {
        for block in 0..64u64 {
            let tx = tx.clone();
            let request = if block % 4 == 0 {
                Request::Write {
                    image: image(),
                    tier: Tier::Ram,
                    block: 2000 + block,
                    offset: 0,
                    data: vec![block as u8; 64 << 10],
                }
            } else {
                read(block, 700)
            };
            client.call(
                request,
                Box::new(move |result| tx.send((block, result)).unwrap()),
            );
        }
    });
    for _ in 0..64 {
        let (block, result) = rx.recv_timeout(WAIT).expect("every call completes");
        match (block % 4, result) {
            (0, Ok(Response::Ok)) => {}
            (_, Ok(Response::Data(data))) => assert_eq!(data, block_bytes(block, 700)),
            other => panic!("call {block}: {other:?}"),
        }
    }
    let written = toy.written.lock().unwrap();
    assert_eq!(written.get(&2060), Some(&vec![60u8; 64 << 10]));
}
