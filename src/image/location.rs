//! Where a copy of a block lives: a node, a tier on that node, and whether it is in sync.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::name::NameError;

/// Why a tier, node id or placement written by an operator (or read from metadata) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error("unknown tier '{0}': use ram or volume")]
    UnknownTier(String),
    /// Node ids follow the rules of image names.
    #[error("bad node id '{text}': {}", node_rule(source))]
    BadNodeId {
        text: String,
        #[source]
        source: NameError,
    },
    #[error("'{0}' is not NODE:TIER (e.g. node1:ram)")]
    NotPlacement(String),
}

/// An image-name rule, said of a node id.
fn node_rule(e: &NameError) -> String {
    e.to_string().replace("image name", "node id")
}

/// The storage tier of a copy: RAM (tmpfs) for hot images, volume (a disk file system) for
/// the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Ram,
    Volume,
}

impl FromStr for Tier {
    type Err = LocationError;
    fn from_str(text: &str) -> Result<Self, LocationError> {
        match text {
            "ram" => Ok(Tier::Ram),
            "volume" => Ok(Tier::Volume),
            other => Err(LocationError::UnknownTier(other.to_string())),
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

/// A node's identifier, checked like an image name (`[A-Za-z0-9._-]`, 1 to 64 characters):
/// it appears in paths, logs and metadata. A daemon started without `--node` is `local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    pub fn local() -> Self {
        NodeId("local".to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = LocationError;
    fn from_str(text: &str) -> Result<Self, LocationError> {
        text.parse::<super::ImageName>()
            .map(|checked| NodeId(checked.as_str().to_string()))
            .map_err(|source| LocationError::BadNodeId {
                text: text.to_string(),
                source,
            })
    }
}

impl TryFrom<String> for NodeId {
    type Error = LocationError;
    fn try_from(text: String) -> Result<Self, LocationError> {
        text.parse()
    }
}

impl From<NodeId> for String {
    fn from(node: NodeId) -> String {
        node.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a copy goes, as operators write it: `NODE:TIER`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Placement {
    pub node: NodeId,
    pub tier: Tier,
}

impl FromStr for Placement {
    type Err = LocationError;
    fn from_str(text: &str) -> Result<Self, LocationError> {
        let (node, tier) = text
            .rsplit_once(':')
            .ok_or_else(|| LocationError::NotPlacement(text.to_string()))?;
        Ok(Placement {
            node: node.parse()?,
            tier: tier.parse()?,
        })
    }
}

impl TryFrom<String> for Placement {
    type Error = LocationError;
    fn try_from(text: String) -> Result<Self, LocationError> {
        text.parse()
    }
}

impl From<Placement> for String {
    fn from(placement: Placement) -> String {
        placement.to_string()
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.tier)
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

impl Location {
    pub fn at(&self, placement: &Placement) -> bool {
        self.node == placement.node && self.tier == placement.tier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_parse() {
        let p: Placement = "node-1:volume".parse().unwrap();
        assert_eq!((p.node.as_str(), p.tier), ("node-1", Tier::Volume));
        assert!("node1".parse::<Placement>().is_err());
        assert!("node1:ssd".parse::<Placement>().is_err());
        assert!("../x:ram".parse::<Placement>().is_err());
        assert!(":ram".parse::<Placement>().is_err());
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            "node1".parse::<Placement>().unwrap_err(),
            LocationError::NotPlacement("node1".into())
        );
        assert_eq!(
            "n:ssd".parse::<Placement>().unwrap_err().to_string(),
            "unknown tier 'ssd': use ram or volume"
        );
        let e = "a/b:ram".parse::<Placement>().unwrap_err();
        assert!(matches!(&e, LocationError::BadNodeId { text, .. } if text == "a/b"));
        assert_eq!(
            e.to_string(),
            "bad node id 'a/b': node id may only contain A-Z, a-z, 0-9, '.', '_' and '-' (found '/')"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn node_ids_are_checked_when_read() {
        assert!(serde_json::from_str::<NodeId>("\"a/b\"").is_err());
        assert_eq!(
            serde_json::from_str::<NodeId>("\"b\"").unwrap().as_str(),
            "b"
        );
    }
}
