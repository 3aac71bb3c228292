//! Where a copy of a block lives: a node, a tier on that node, and whether it is in sync.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The storage tier of a copy: RAM (tmpfs) for hot images, volume (a disk file system) for
/// the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Ram,
    Volume,
}

impl FromStr for Tier {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "ram" => Ok(Tier::Ram),
            "volume" => Ok(Tier::Volume),
            other => Err(format!("unknown tier '{other}': use ram or volume")),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Ram => "ram",
            Tier::Volume => "volume",
        })
    }
}

/// A node's identifier. A daemon started without `--node` is the single node `local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl NodeId {
    pub fn local() -> Self {
        NodeId("local".to_string())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One copy of a block. `synced` is false while the copy may hold older data than the others;
/// such a copy is never read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location {
    pub node: NodeId,
    pub tier: Tier,
    pub synced: bool,
}
