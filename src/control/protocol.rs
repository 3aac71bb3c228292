//! The control protocol: one JSON request per connection on `<run-dir>/control.sock`,
//! answered by JSON lines: any number of `progress` lines, then one `ok` or `error` line.

use serde::{Deserialize, Serialize};

use crate::image::{ImageName, Tier};

/// Longest request line the daemon reads; requests are small, so anything longer is junk.
pub const MAX_REQUEST_LEN: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Allowed when no image of that name exists.
    ImageCreate {
        name: ImageName,
        size: u64,
        block_size: u64,
        tier: Tier,
        read_only: bool,
    },
    ImageList,
    ImageInfo {
        name: ImageName,
    },
    /// Allowed when no frontend is connected to the image.
    ImageRm {
        name: ImageName,
    },
    /// Creates `name` from a raw file; allowed when no image of that name exists.
    ImageImport {
        name: ImageName,
        path: String,
        block_size: u64,
        tier: Tier,
    },
    /// Writes the image to a raw file (sparse); allowed at any time, consistent when no
    /// frontend is writing.
    ImageExport {
        name: ImageName,
        path: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Progress { done: u64, total: u64 },
    Ok(serde_json::Value),
    Error(String),
}
