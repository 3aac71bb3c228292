//! Image names: checked once, so no path is ever built from an unchecked string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted name. Names become file and socket names; 64 keeps
/// `<run-dir>/<name>.sock` well inside the 108-byte `sun_path` for ordinary run dirs.
pub const MAX_NAME_LEN: usize = 64;

/// A validated image name: `[A-Za-z0-9._-]`, 1 to 64 characters, no leading dot.
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
}

impl ImageName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
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
        if name.starts_with('.') {
            return Err(NameError::LeadingDot);
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::BadChar(bad));
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
    fn deserialising_checks_too() {
        assert!(serde_json::from_str::<ImageName>("\"../etc\"").is_err());
        assert!(serde_json::from_str::<ImageName>("\"disk0\"").is_ok());
    }
}
