//! Image names: checked once, so no path is ever built from an unchecked string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted name. Names become file and socket names; 64 keeps
/// `<run-dir>/<name>.sock` well inside the 108-byte `sun_path` for ordinary run dirs.
pub const MAX_NAME_LEN: usize = 64;

/// A validated image name: `[A-Za-z0-9._-]`, 1 to 64 characters, no leading dot. A
/// snapshot's name is its image's name, `@` and the snapshot's own name (`vm1@monday`), so a
/// snapshot can never take a name an ordinary image could have.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageName(String);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("image name is empty")]
    Empty,
    #[error("image name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("image name may not start with a dot")]
    LeadingDot,
    #[error("image name may only contain A-Z, a-z, 0-9, '.', '_' and '-' (found {0:?})")]
    BadChar(char),
    #[error("a snapshot name is IMAGE@SNAPSHOT, with one '@' between two names")]
    BadSnapshot,
}

impl ImageName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of snapshot `snap` of this image; refused for a snapshot's name (a snapshot
    /// of a snapshot is a clone's snapshot: clone it first) or a name too long.
    pub fn snapshot(&self, snap: &ImageName) -> Result<ImageName, NameError> {
        if self.is_snapshot() || snap.is_snapshot() {
            return Err(NameError::BadSnapshot);
        }
        format!("{self}@{snap}").parse()
    }

    /// Whether this names a snapshot (`image@snap`).
    pub fn is_snapshot(&self) -> bool {
        self.0.contains('@')
    }

    /// The image a snapshot was taken of; `None` for an image's own name.
    pub fn snapshot_of(&self) -> Option<ImageName> {
        let (image, _) = self.0.split_once('@')?;
        Some(ImageName(image.to_string()))
    }
}

/// Checks one `[A-Za-z0-9._-]` part of a name.
fn check_part(part: &str) -> Result<(), NameError> {
    if part.is_empty() {
        return Err(NameError::Empty);
    }
    if part.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    if let Some(bad) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::BadChar(bad));
    }
    Ok(())
}

impl FromStr for ImageName {
    type Err = NameError;

    fn from_str(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        match name.split_once('@') {
            None => check_part(name)?,
            Some((image, snap)) => {
                check_part(image).map_err(|_| NameError::BadSnapshot)?;
                check_part(snap).map_err(|_| NameError::BadSnapshot)?;
            }
        }
        Ok(ImageName(name.to_string()))
    }
}

impl TryFrom<String> for ImageName {
    type Error = NameError;
    fn try_from(name: String) -> Result<Self, NameError> {
        name.parse()
    }
}

impl From<ImageName> for String {
    fn from(name: ImageName) -> String {
        name.0
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["disk0", "a", "vm-1.root_disk", &"x".repeat(64)] {
            assert!(ok.parse::<ImageName>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_paths_and_oddities() {
        assert_eq!("".parse::<ImageName>(), Err(NameError::Empty));
        assert_eq!("x".repeat(65).parse::<ImageName>(), Err(NameError::TooLong));
        assert_eq!(".hidden".parse::<ImageName>(), Err(NameError::LeadingDot));
        assert_eq!("..".parse::<ImageName>(), Err(NameError::LeadingDot));
        assert_eq!("a/b".parse::<ImageName>(), Err(NameError::BadChar('/')));
        assert_eq!("a b".parse::<ImageName>(), Err(NameError::BadChar(' ')));
        assert_eq!("é".parse::<ImageName>(), Err(NameError::BadChar('é')));
    }

    #[test]
    fn snapshot_names_have_one_at_between_two_names() {
        let vm: ImageName = "vm1".parse().unwrap();
        let snap = vm.snapshot(&"monday".parse().unwrap()).unwrap();
        assert_eq!(snap.as_str(), "vm1@monday");
        assert!(snap.is_snapshot() && !vm.is_snapshot());
        assert_eq!(snap.snapshot_of(), Some(vm.clone()));
        assert_eq!(snap.as_str().parse::<ImageName>(), Ok(snap.clone()));
        assert!(snap.snapshot(&vm).is_err());
        for bad in ["@a", "a@", "a@b@c", "a@.b", "a@b/c"] {
            assert_eq!(
                bad.parse::<ImageName>(),
                Err(NameError::BadSnapshot),
                "{bad}"
            );
        }
    }

    #[test]
    fn deserialising_checks_too() {
        assert!(serde_json::from_str::<ImageName>("\"../etc\"").is_err());
        assert!(serde_json::from_str::<ImageName>("\"disk0\"").is_ok());
    }
}
