//! The optional Prometheus endpoint: `GET /metrics` over plain HTTP/1.0, one short-lived
//! connection at a time (scrapes are seconds apart; nothing here needs more).

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::daemon::Daemon;

/// Longest a scraper may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub fn start(daemon: Arc<Daemon>, addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    log::info!("metrics on http://{addr}/metrics");
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(&daemon, stream) {
                    log::debug!("metrics: {e}");
                }
            }
        })?;
    Ok(())
}

fn answer(daemon: &Daemon, mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut request_line = String::new();
    BufReader::new(std::io::Read::take(&stream, 8192)).read_line(&mut request_line)?;
    let (status, body) = if request_line.starts_with("GET /metrics") {
        ("200 OK", daemon.prometheus())
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}
