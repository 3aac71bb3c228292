//! `cormorant stats` and the Prometheus endpoint count what the guest did.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::daemon::Daemon;
use common::TestDir;
use cormorant_frontend::{BlkClient, ClientOptions, Malformed};

#[test]
fn stats_count_requests_bytes_and_errors() {
    let dir = TestDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = Daemon::start_with(
        dir.path(),
        vec!["--metrics-listen".to_string(), addr.clone()],
    );
    daemon.cli(&["image", "create", "s", "--size", "8M"]);
    let mut c = BlkClient::connect(daemon.socket("s"), &ClientOptions::default()).unwrap();
    for i in 0..10u64 {
        assert_eq!(c.write(0, i * 8, &[1; 4096]).unwrap(), 0);
    }
    for i in 0..5u64 {
        assert_eq!(c.read(0, i * 8, 4096).unwrap().0, 0);
    }
    let capacity = c.config().capacity;
    let q = c.queue(0).unwrap();
    let bad = q.malformed(Malformed::SectorPastEnd, capacity).unwrap();
    q.run_raw(&bad, std::time::Duration::from_secs(3)).unwrap();

    let stats = daemon.cli(&["stats", "s"]);
    assert_eq!(stats["writes"], 10);
    assert_eq!(stats["reads"], 5);
    assert_eq!(stats["write_bytes"], 40960);
    assert_eq!(stats["guest_errors"], 1);
    // Latency is sampled (one request in 16 per queue, the first among them).
    let sampled = stats["latency"]["count"].as_u64().unwrap();
    assert!((1..=2).contains(&sampled), "{sampled} latency samples");
    assert_eq!(stats["in_flight"], 0);
    assert_eq!(stats["out_of_sync_copies"], 0);
    let all = daemon.cli(&["stats"]);
    assert_eq!(all["images"]["s"]["writes"], 10);

    let mut http = TcpStream::connect(&addr).unwrap();
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    http.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(
        body.contains("cormorant_image_writes_total{image=\"s\"} 10"),
        "{body}"
    );
    assert!(body.contains(&format!(
        "cormorant_image_request_seconds_count{{image=\"s\"}} {sampled}"
    )));
}
