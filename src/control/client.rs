//! The client side of the control socket, used by every subcommand but `serve`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::protocol::{Reply, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {path}: {source} (is `cormorant serve` running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the daemon's answer: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent a malformed reply: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("the daemon closed the connection without an answer")]
    NoAnswer,
    #[error("{0}")]
    Refused(String),
}

/// Sends `request`, calls `progress(done, total)` for each progress line, returns the result.
pub fn call(
    socket: &Path,
    request: &Request,
    progress: impl FnMut(u64, u64),
) -> Result<serde_json::Value, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    read_answer(stream, progress)
}

/// Reads the daemon's answer: JSON lines, any number of `progress` (each passed to
/// `progress(done, total)`), then `ok` (the result) or `error`. A malformed line or an answer
/// that ends early is an error, never a panic (fuzzed: fuzz/fuzz_targets/control.rs).
pub fn read_answer(
    reader: impl Read,
    mut progress: impl FnMut(u64, u64),
) -> Result<serde_json::Value, ClientError> {
    for line in BufReader::new(reader).lines() {
        match serde_json::from_str::<Reply>(&line?)? {
            Reply::Progress { done, total } => progress(done, total),
            Reply::Ok(value) => return Ok(value),
            Reply::Error(message) => return Err(ClientError::Refused(message)),
        }
    }
    Err(ClientError::NoAnswer)
}
