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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_progress_then_the_result() {
        let answer = b"{\"progress\":{\"done\":1,\"total\":2}}\n{\"ok\":{\"n\":3}}\n{\"ok\":4}\n";
        let mut seen = Vec::new();
        let value = read_answer(&answer[..], |done, total| seen.push((done, total))).unwrap();
        assert_eq!(value, serde_json::json!({"n": 3}));
        assert_eq!(seen, [(1, 2)]);
    }

    #[test]
    fn errors_and_short_answers_are_errors() {
        let refused = b"{\"error\":\"no image named 'x'\"}\n";
        match read_answer(&refused[..], |_, _| {}) {
            Err(ClientError::Refused(message)) => assert_eq!(message, "no image named 'x'"),
            other => panic!("{other:?}"),
        }
        let short = b"{\"progress\":{\"done\":1,\"total\":2}}\n";
        assert!(matches!(
            read_answer(&short[..], |_, _| {}),
            Err(ClientError::NoAnswer)
        ));
        assert!(matches!(
            read_answer(&b"{\"ok\":\n"[..], |_, _| {}),
            Err(ClientError::Malformed(_))
        ));
    }
}
