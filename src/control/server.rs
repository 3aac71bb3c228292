//! The control socket server: one thread accepts, one short-lived thread per request.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread;

use super::protocol::{Reply, Request, MAX_REQUEST_LEN};
use crate::daemon::Daemon;

/// Binds `<run-dir>/control.sock` with mode 0600 (only the daemon's user may steer it) and
/// serves it on a background thread.
pub fn start(daemon: Arc<Daemon>, path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = crate::vhost_listener::bind_socket(path, |p| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
    })?;
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let daemon = daemon.clone();
                let spawned = thread::Builder::new()
                    .name("control-req".into())
                    .spawn(move || serve(&daemon, stream));
                if let Err(e) = spawned {
                    log::error!("control: cannot start a request thread: {e}");
                }
            }
        })?;
    Ok(())
}

/// Why a request line was not read: each answered with an `error` line.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot read request: {0}")]
    Io(#[from] std::io::Error),
    #[error("request too long or unterminated")]
    Unterminated,
    #[error("malformed request: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Reads the one request line of a connection: at most [`MAX_REQUEST_LEN`] bytes, ending in a
/// newline, holding one JSON [`Request`]. Whatever a local client sends gets a request or an
/// error, never a panic (fuzzed: fuzz/fuzz_targets/control.rs).
pub fn read_request(reader: impl Read) -> Result<Request, RequestError> {
    let mut line = String::new();
    BufReader::new(reader.take(MAX_REQUEST_LEN as u64)).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(RequestError::Unterminated);
    }
    Ok(serde_json::from_str::<Request>(&line)?)
}

fn serve(daemon: &Daemon, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let reply = match read_request(stream) {
        Err(e) => Reply::Error(e.to_string()),
        Ok(request) => {
            log::debug!("control: {request:?}");
            let mut progress = |done, total| {
                let _ = send(&mut writer, &Reply::Progress { done, total });
            };
            match daemon.apply(request, &mut progress) {
                Ok(value) => Reply::Ok(value),
                Err(e) => Reply::Error(e.to_string()),
            }
        }
    };
    let _ = send(&mut writer, &reply);
}

fn send(writer: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    writer.write_all(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_request_line() {
        let line = b"{\"op\":\"image_info\",\"name\":\"vm1\"}\n{\"op\":\"image_list\"}\n";
        match read_request(&line[..]).unwrap() {
            Request::ImageInfo { name } => assert_eq!(name.as_str(), "vm1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_unterminated_long_and_malformed_requests() {
        let unterminated = br#"{"op":"image_list"}"#;
        assert!(matches!(
            read_request(&unterminated[..]),
            Err(RequestError::Unterminated)
        ));
        let long = [b' '; MAX_REQUEST_LEN + 10];
        assert!(matches!(
            read_request(&long[..]),
            Err(RequestError::Unterminated)
        ));
        let unknown = b"{\"op\":\"format_disk\"}\n";
        assert!(matches!(
            read_request(&unknown[..]),
            Err(RequestError::Malformed(_))
        ));
        let bad_name = b"{\"op\":\"image_info\",\"name\":\"../x\"}\n";
        assert!(matches!(
            read_request(&bad_name[..]),
            Err(RequestError::Malformed(_))
        ));
    }
}
