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

fn serve(daemon: &Daemon, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST_LEN as u64));
    let reply = match reader.read_line(&mut line) {
        Err(e) => Reply::Error(format!("cannot read request: {e}")),
        Ok(_) if !line.ends_with('\n') => Reply::Error("request too long or unterminated".into()),
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Error(format!("malformed request: {e}")),
            Ok(request) => {
                log::debug!("control: {request:?}");
                let mut progress = |done, total| {
                    let _ = send(&mut writer, &Reply::Progress { done, total });
                };
                match daemon.apply(request, &mut progress) {
                    Ok(value) => Reply::Ok(value),
                    Err(message) => Reply::Error(message),
                }
            }
        },
    };
    let _ = send(&mut writer, &reply);
}

fn send(writer: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    writer.write_all(&bytes)
}
