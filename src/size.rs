//! Byte sizes as operators type them (`20G`, `4M`, `512`), parsed once at the edge.

use std::fmt;
use std::str::FromStr;

/// A size in bytes, parsed from a number with an optional binary suffix (K, M, G, T; powers
/// of 1024, as `qemu-img` reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error("'{0}' is not a size: use a number with an optional K, M, G or T suffix")]
    Malformed(String),
    #[error("size '{0}' is too large")]
    Overflow(String),
}

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(text: &str) -> Result<Self, SizeError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(SizeError::Empty);
        }
        let (digits, shift) = match text.as_bytes()[text.len() - 1].to_ascii_uppercase() {
            b'K' => (&text[..text.len() - 1], 10),
            b'M' => (&text[..text.len() - 1], 20),
            b'G' => (&text[..text.len() - 1], 30),
            b'T' => (&text[..text.len() - 1], 40),
            b'B' => (&text[..text.len() - 1], 0),
            _ => (text, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SizeError::Malformed(text.to_string()));
        }
        let value: u64 = digits
            .parse()
            .map_err(|_| SizeError::Overflow(text.to_string()))?;
        value
            .checked_mul(1u64 << shift)
            .map(Size)
            .ok_or_else(|| SizeError::Overflow(text.to_string()))
    }
}

impl fmt::Display for Size {
    /// Prints the largest suffix that divides the size exactly, so `Display` round-trips.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
            let unit = 1u64 << shift;
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{}", self.0 / unit, suffix);
            }
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!("512".parse(), Ok(Size(512)));
        assert_eq!("4M".parse(), Ok(Size(4 << 20)));
        assert_eq!("20g".parse(), Ok(Size(20 << 30)));
        assert_eq!("1T".parse(), Ok(Size(1 << 40)));
        assert_eq!("3K".parse(), Ok(Size(3072)));
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        assert_eq!("".parse::<Size>(), Err(SizeError::Empty));
        assert!(matches!("4X".parse::<Size>(), Err(SizeError::Malformed(_))));
        assert!(matches!("-1".parse::<Size>(), Err(SizeError::Malformed(_))));
        assert!(matches!("G".parse::<Size>(), Err(SizeError::Malformed(_))));
        assert!(matches!(
            "99999999999T".parse::<Size>(),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn display_round_trips() {
        for text in ["4M", "20G", "1T", "1536K", "513"] {
            assert_eq!(text.parse::<Size>().unwrap().to_string(), text);
        }
    }
}
