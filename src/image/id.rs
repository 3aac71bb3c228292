//! Image ids: every image gets a random id when it is created, and its block files live in a
//! directory named after name and id. An image deleted and created again under the same name
//! therefore never finds the old one's files: a leftover (on a node that was down when the
//! image was removed) can never be read by the new image.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// 64 random bits, printed as 16 hex digits. `ImageId::LEGACY` (0) marks images made before
/// ids existed: their directory is the bare name, as it always was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageId(u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("image id {0:?} is not 16 hex digits")]
pub struct IdError(String);

impl ImageId {
    pub const LEGACY: ImageId = ImageId(0);

    /// A fresh random id (never `LEGACY`).
    pub fn random() -> ImageId {
        loop {
            let mut bytes = [0u8; 8];
            // A failing system RNG leaves no way to make unique ids: stop loudly.
            #[allow(clippy::expect_used)]
            getrandom::fill(&mut bytes).expect("the system random source works");
            let id = u64::from_le_bytes(bytes);
            if id != 0 {
                return ImageId(id);
            }
        }
    }

    pub fn is_legacy(self) -> bool {
        self == Self::LEGACY
    }

    /// The directory name of an image's block files on a tier: `<name>@<id>`.
    pub fn dir_name(self, name: &super::ImageName) -> String {
        if self.is_legacy() {
            name.to_string()
        } else {
            format!("{name}@{self}")
        }
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for ImageId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<Self, IdError> {
        if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdError(text.to_string()));
        }
        u64::from_str_radix(text, 16)
            .map(ImageId)
            .map_err(|_| IdError(text.to_string()))
    }
}

impl TryFrom<String> for ImageId {
    type Error = IdError;
    fn try_from(text: String) -> Result<Self, IdError> {
        text.parse()
    }
}

impl From<ImageId> for String {
    fn from(id: ImageId) -> String {
        id.to_string()
    }
}

/// Splits a block directory's name into image name and id (`None` for names that are not
/// block directories, such as `.meta`). A snapshot's directory is `<image>@<snap>@<id>`.
pub fn parse_dir_name(dir: &str) -> Option<(super::ImageName, ImageId)> {
    match dir.rsplit_once('@') {
        Some((name, id)) => Some((name.parse().ok()?, id.parse().ok()?)),
        None => Some((dir.parse().ok()?, ImageId::LEGACY)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_differ() {
        let a = ImageId::random();
        let b = ImageId::random();
        assert_ne!(a, b);
        assert_eq!(a.to_string().parse::<ImageId>().unwrap(), a);
        assert!("xyz".parse::<ImageId>().is_err());
        assert!("00000000000000001".parse::<ImageId>().is_err());
        assert!("+000000000000001".parse::<ImageId>().is_err());
    }

    #[test]
    fn directory_names() {
        let name: super::super::ImageName = "disk0".parse().unwrap();
        assert_eq!(ImageId::LEGACY.dir_name(&name), "disk0");
        let id: ImageId = "00000000000000ff".parse().unwrap();
        assert_eq!(id.dir_name(&name), "disk0@00000000000000ff");
        assert_eq!(
            parse_dir_name("disk0@00000000000000ff"),
            Some((name.clone(), id))
        );
        assert_eq!(parse_dir_name("disk0"), Some((name, ImageId::LEGACY)));
        assert_eq!(parse_dir_name(".meta"), None);
        assert_eq!(parse_dir_name("disk0@zz"), None);
        let snap: super::super::ImageName = "disk0@monday".parse().unwrap();
        assert_eq!(parse_dir_name(&id.dir_name(&snap)), Some((snap, id)));
    }
}
