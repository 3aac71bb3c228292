//! Striping (RAID-0 across nodes or volumes): an image whose blocks are spread over an ordered
//! list of members, `width` blocks at a time, each block on `copies` consecutive members.
//!
//! Block `i` belongs to stripe unit `i / width`; the unit's first copy goes on member
//! `unit mod M` (M members) and its other copies on the members after it, in order, wrapping
//! around. So a block never has two copies on one member (copies <= M), every run of
//! `M * width` consecutive blocks puts exactly `copies * width` of them on each member, and a
//! sequential reader moves from member to member every `width` blocks.
//!
//! The layout is a pure function of the block index, the members, the width and the copies:
//! nothing here looks at the image's size or at what is stored where. The block table holds
//! the copies that exist (the truth for I/O); the stripe is the rule they were placed by,
//! kept with the image so `image info` can show it and location changes can act per member.
//! After any location change, [`Stripe::reconcile`] marks the members that no longer hold
//! every block the rule gives them (`incomplete`), so the description never claims a copy the
//! table does not have.

use serde::{Deserialize, Serialize};

use crate::image::table::{BlockTable, Extent, TableError};
use crate::image::{BlockRange, Location, Placement};

/// Most members a stripe may have: one block's copies are found by scanning the members, and
/// a stripe wider than this many nodes or volumes spreads each guest request thinner than a
/// useful stripe unit anyway.
pub const MAX_MEMBERS: usize = 64;

/// Why a stripe description (from an operator, or read from metadata) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeError {
    #[error("a stripe needs at least one member (--stripe a:volume,b:volume,...)")]
    NoMembers,
    #[error("a stripe has at most {MAX_MEMBERS} members, not {0}")]
    TooManyMembers(usize),
    #[error("stripe member {0} is named twice: a block would get two copies on it")]
    Repeated(Placement),
    #[error("--copies {copies} is more than the stripe's {members} members: a block would get two copies on one member")]
    TooManyCopies { copies: u32, members: usize },
    #[error("--copies must be at least 1")]
    NoCopies,
    #[error("--stripe-width must be at least 1 block")]
    NoWidth,
}

/// What an operator asks for: `--stripe a:volume,b:volume --stripe-width N --copies K`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeSpec {
    pub members: Vec<Placement>,
    /// Blocks per stripe unit; 1 when left out.
    #[serde(default)]
    pub width: Option<u64>,
    /// Copies of each block, on consecutive members; 1 when left out.
    #[serde(default)]
    pub copies: Option<u32>,
}

/// One member of a stripe: where its copies go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub at: Placement,
    /// Some block the layout places on this member has no copy there (a `location rm`
    /// took it). Derived from the block table after every change ([`Stripe::reconcile`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incomplete: bool,
}

/// A stripe layout, validated: members in order, the width of a stripe unit in blocks, and
/// the copies of each block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StripeFile", into = "StripeFile")]
pub struct Stripe {
    members: Vec<Member>,
    width: u64,
    copies: u32,
}

/// The persisted form of a [`Stripe`], checked when read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeFile {
    pub members: Vec<Member>,
    pub width: u64,
    pub copies: u32,
}

impl TryFrom<StripeFile> for Stripe {
    type Error = StripeError;
    fn try_from(file: StripeFile) -> Result<Self, StripeError> {
        let at: Vec<Placement> = file.members.iter().map(|m| m.at.clone()).collect();
        check(&at, file.width, file.copies)?;
        Ok(Stripe {
            members: file.members,
            width: file.width,
            copies: file.copies,
        })
    }
}

impl From<Stripe> for StripeFile {
    fn from(stripe: Stripe) -> StripeFile {
        StripeFile {
            members: stripe.members,
            width: stripe.width,
            copies: stripe.copies,
        }
    }
}

/// The rules every stripe obeys, however it was written.
fn check(members: &[Placement], width: u64, copies: u32) -> Result<(), StripeError> {
    if members.is_empty() {
        return Err(StripeError::NoMembers);
    }
    if members.len() > MAX_MEMBERS {
        return Err(StripeError::TooManyMembers(members.len()));
    }
    for (i, member) in members.iter().enumerate() {
        if members[..i].contains(member) {
            return Err(StripeError::Repeated(member.clone()));
        }
    }
    if width == 0 {
        return Err(StripeError::NoWidth);
    }
    if copies == 0 {
        return Err(StripeError::NoCopies);
    }
    if copies as usize > members.len() {
        return Err(StripeError::TooManyCopies {
            copies,
            members: members.len(),
        });
    }
    Ok(())
}

impl Stripe {
    /// A stripe as an operator asked for it, checked: at least one member, none named
    /// twice, width and copies at least 1, no more copies than members.
    pub fn new(spec: &StripeSpec) -> Result<Stripe, StripeError> {
        let width = spec.width.unwrap_or(1);
        let copies = spec.copies.unwrap_or(1);
        check(&spec.members, width, copies)?;
        Ok(Stripe {
            members: spec
                .members
                .iter()
                .map(|at| Member {
                    at: at.clone(),
                    incomplete: false,
                })
                .collect(),
            width,
            copies,
        })
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn width(&self) -> u64 {
        self.width
    }

    pub fn copies(&self) -> u32 {
        self.copies
    }

    /// The members holding block `block`'s copies, by index into [`Stripe::members`]: the
    /// first copy's member, then the next ones in order. A pure function of the block index.
    pub fn members_of(&self, block: u64) -> impl Iterator<Item = usize> {
        let count = self.members.len() as u64;
        let first = (block / self.width) % count;
        (0..u64::from(self.copies)).map(move |k| ((first + k) % count) as usize)
    }

    /// The copies a new image's block `block` gets: on its members, in sync (an unwritten
    /// block reads as zeros everywhere).
    pub fn locations(&self, block: u64) -> Vec<Location> {
        self.members_of(block)
            .map(|m| Location {
                node: self.members[m].at.node.clone(),
                tier: self.members[m].at.tier,
                synced: true,
            })
            .collect()
    }

    /// The block table of a new striped image of `blocks` blocks: one extent per stripe unit
    /// (the table keeps each of the M distinct location lists once).
    pub fn table(&self, blocks: u64) -> Result<BlockTable, TableError> {
        let mut extents = Vec::new();
        let mut start = 0;
        while start < blocks {
            let end = (start / self.width + 1)
                .saturating_mul(self.width)
                .min(blocks);
            let Ok(range) = BlockRange::new(start, end) else {
                break; // INVARIANT: start < end; a table missing blocks is refused below
            };
            extents.push(Extent {
                blocks: range,
                locations: self.locations(start),
            });
            start = end;
        }
        BlockTable::from_extents(blocks, &extents)
    }

    /// The member whose copies are at `at`, if any.
    pub fn member_at(&self, at: &Placement) -> Option<usize> {
        self.members.iter().position(|m| &m.at == at)
    }

    /// Member `from`'s place in the layout goes to `to` (a `location add --replace` that
    /// gave `to` a copy of every block the layout places on `from`). Refused when `to` is a
    /// member already.
    pub fn replace(&mut self, from: &Placement, to: &Placement) -> Result<bool, StripeError> {
        let Some(index) = self.member_at(from) else {
            return Ok(false);
        };
        if self.member_at(to).is_some() {
            return Err(StripeError::Repeated(to.clone()));
        }
        self.members[index].at = to.clone();
        Ok(true)
    }

    /// Whether block `block` is one the layout places on member `member`.
    pub fn places(&self, block: u64, member: usize) -> bool {
        self.members_of(block).any(|m| m == member)
    }

    /// Marks each member `incomplete` exactly when some block the layout places on it has no
    /// copy there in `table`, so the description agrees with the copies that exist.
    pub fn reconcile(&mut self, table: &BlockTable) {
        let mut incomplete = vec![false; self.members.len()];
        for block in 0..table.blocks() {
            let locations = table.locations(block).unwrap_or(&[]);
            for m in self.members_of(block) {
                if !locations.iter().any(|l| l.at(&self.members[m].at)) {
                    incomplete[m] = true;
                }
            }
        }
        for (member, incomplete) in self.members.iter_mut().zip(incomplete) {
            member.incomplete = incomplete;
        }
    }

    /// The blocks of `range` the layout places on the member at `at` (none when `at` is
    /// not a member).
    pub fn blocks_of(&self, at: &Placement, range: BlockRange) -> Vec<u64> {
        match self.member_at(at) {
            Some(m) => range.iter().filter(|&b| self.places(b, m)).collect(),
            None => Vec::new(),
        }
    }

    /// What `image info` shows of the stripe.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "members": self.members,
            "width": self.width,
            "copies": self.copies,
        })
    }
}

#[cfg(test)]
mod tests;
