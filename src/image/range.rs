//! Half-open block ranges (`0..32` is blocks 0 to 31), as operators and metadata write them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Blocks `start..end`, half-open like Rust's ranges; never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BlockRange {
    start: u64,
    end: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    #[error("block range '{0}' is not of the form A..B")]
    Malformed(String),
    #[error("block range {0}..{1} is empty")]
    Empty(u64, u64),
    #[error("block range {range} reaches past the image's {blocks} blocks")]
    PastEnd { range: BlockRange, blocks: u64 },
}

impl BlockRange {
    pub fn new(start: u64, end: u64) -> Result<Self, RangeError> {
        if start >= end {
            return Err(RangeError::Empty(start, end));
        }
        Ok(BlockRange { start, end })
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Always false: an empty range cannot be built. Here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Checks the range against an image of `blocks` blocks.
    pub fn within(self, blocks: u64) -> Result<Self, RangeError> {
        if self.end > blocks {
            return Err(RangeError::PastEnd {
                range: self,
                blocks,
            });
        }
        Ok(self)
    }

    pub fn iter(&self) -> std::ops::Range<u64> {
        self.start..self.end
    }
}

impl FromStr for BlockRange {
    type Err = RangeError;

    fn from_str(text: &str) -> Result<Self, RangeError> {
        let malformed = || RangeError::Malformed(text.to_string());
        let (a, b) = text.split_once("..").ok_or_else(malformed)?;
        let number = |s: &str| -> Result<u64, RangeError> {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                return Err(malformed());
            }
            s.parse().map_err(|_| malformed())
        };
        BlockRange::new(number(a)?, number(b)?)
    }
}

impl TryFrom<String> for BlockRange {
    type Error = RangeError;
    fn try_from(text: String) -> Result<Self, RangeError> {
        text.parse()
    }
}

impl From<BlockRange> for String {
    fn from(range: BlockRange) -> String {
        range.to_string()
    }
}

impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_half_open() {
        let r: BlockRange = "0..32".parse().unwrap();
        assert_eq!((r.start(), r.end(), r.len()), (0, 32, 32));
        assert_eq!(r.iter().last(), Some(31));
    }

    #[test]
    fn rejects_bad_ranges() {
        for bad in [
            "", "..", "1..", "..2", "a..b", "1...2", "-1..2", "1..2..3", " 1..2",
        ] {
            assert!(bad.parse::<BlockRange>().is_err(), "{bad:?}");
        }
        assert_eq!("5..5".parse::<BlockRange>(), Err(RangeError::Empty(5, 5)));
        assert_eq!("6..5".parse::<BlockRange>(), Err(RangeError::Empty(6, 5)));
        assert!("0..99999999999999999999".parse::<BlockRange>().is_err());
    }

    #[test]
    fn checks_bounds() {
        let r: BlockRange = "0..10".parse().unwrap();
        assert!(r.within(10).is_ok());
        assert!(r.within(9).is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(start in 0u64..u64::MAX - 1, len in 1u64..1000) {
            let end = start.saturating_add(len);
            prop_assume!(start < end);
            let r = BlockRange::new(start, end).unwrap();
            prop_assert_eq!(r.to_string().parse::<BlockRange>().unwrap(), r);
        }

        #[test]
        fn never_panics_on_text(text in ".{0,40}") {
            let _ = text.parse::<BlockRange>();
        }
    }
}
