//! Changing where an image's blocks live: adding and removing copies. Each change is saved
//! before it takes effect; removing a copy never leaves a block without an in-sync copy.
//! A striped image's description follows every change (`Stripe::reconcile`), in the same
//! saved change.

use crate::disk::Disk;
use crate::image::range::RangeError;
use crate::image::table::TableError;
use crate::image::{BlockRange, ImageMeta, Location, Placement};
use crate::stripe::StripeError;

/// Why a placement change was refused or not made.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error(transparent)]
    Range(#[from] RangeError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("refused: block {0} would have no in-sync copy left (sync another copy first)")]
    LastSyncedCopy(u64),
    #[error("refused: {0} cannot replace itself")]
    ReplaceSelf(Placement),
    #[error("refused: no block of {range} has a copy at {from}, nor is placed there by a stripe")]
    NothingToReplace { from: Placement, range: BlockRange },
    #[error("refused: {0}")]
    Stripe(#[from] StripeError),
    /// Saving the changed metadata failed (the change was not made).
    #[error("{0}")]
    Save(String),
}

/// For callers whose errors are still text (daemon/cluster.rs).
impl From<PlacementError> for String {
    fn from(e: PlacementError) -> String {
        e.to_string()
    }
}

/// The range an operator named, or every block, checked against the image.
pub fn range_of(disk: &Disk, blocks: Option<BlockRange>) -> Result<BlockRange, PlacementError> {
    let count = disk.meta().blocks();
    Ok(match blocks {
        Some(range) => range.within(count)?,
        None => BlockRange::new(0, count)?,
    })
}

/// Adds an out-of-sync copy at `at` to every block of `range` that has none there; returns
/// how many blocks got one.
pub fn add(disk: &Disk, range: BlockRange, at: &Placement) -> Result<u64, PlacementError> {
    // `add_to` changes nothing when it fails, so its error rides inside a saved no-change.
    disk.update_meta(|meta| Ok(add_to(meta, range, at)))
        .map_err(PlacementError::Save)?
}

/// [`add`] on a metadata value (to preview a change before it is made). On an error, `meta`
/// is left as it was.
pub fn add_to(
    meta: &mut ImageMeta,
    range: BlockRange,
    at: &Placement,
) -> Result<u64, PlacementError> {
    let added = range
        .iter()
        .filter(|&b| {
            meta.table
                .locations(b)
                .is_some_and(|l| !l.iter().any(|x| x.at(at)))
        })
        .count() as u64;
    meta.table.update(range, |locations| {
        if !locations.iter().any(|l| l.at(at)) {
            locations.push(Location {
                node: at.node.clone(),
                tier: at.tier,
                synced: false,
            });
        }
    })?;
    reconcile(meta);
    Ok(added)
}

/// `location add --at to --replace from`: adds an out-of-sync copy at `to` to every block of
/// `range` that has a copy at `from` or that a stripe places on member `from` (also when
/// `from` lost its copies). When `range` is the whole image and `from` is a stripe member,
/// `to` takes `from`'s place in the layout; `from`'s copies stay until removed (`location
/// rm`, once `to` is in sync). Returns how many blocks got a copy.
pub fn replace(
    disk: &Disk,
    range: BlockRange,
    from: &Placement,
    to: &Placement,
) -> Result<u64, PlacementError> {
    disk.update_meta(|meta| Ok(replace_in(meta, range, from, to)))
        .map_err(PlacementError::Save)?
}

/// [`replace`] on a metadata value; on an error, `meta` is left as it was.
pub fn replace_in(
    meta: &mut ImageMeta,
    range: BlockRange,
    from: &Placement,
    to: &Placement,
) -> Result<u64, PlacementError> {
    if from == to {
        return Err(PlacementError::ReplaceSelf(to.clone()));
    }
    let placed: Vec<u64> = match &meta.stripe {
        Some(stripe) => stripe.blocks_of(from, range),
        None => Vec::new(),
    };
    let blocks: Vec<u64> = range
        .iter()
        .filter(|&b| {
            let held = meta
                .table
                .locations(b)
                .is_some_and(|l| l.iter().any(|x| x.at(from)));
            held || placed.binary_search(&b).is_ok()
        })
        .collect();
    let mut next = meta.clone();
    let whole = range.start() == 0 && range.end() == meta.blocks();
    let moved = match (whole, next.stripe.as_mut()) {
        (true, Some(stripe)) => stripe.replace(from, to)?,
        _ => false,
    };
    // A member of a stripe wider than the image may hold no block: its place still moves.
    if blocks.is_empty() && !moved {
        return Err(PlacementError::NothingToReplace {
            from: from.clone(),
            range,
        });
    }
    let added = blocks
        .iter()
        .filter(|&&b| {
            next.table
                .locations(b)
                .is_some_and(|l| !l.iter().any(|x| x.at(to)))
        })
        .count() as u64;
    next.table
        .update_blocks(blocks.iter().copied(), |locations| {
            if !locations.iter().any(|l| l.at(to)) {
                locations.push(Location {
                    node: to.node.clone(),
                    tier: to.tier,
                    synced: false,
                });
            }
        })?;
    reconcile(&mut next);
    *meta = next;
    Ok(added)
}

/// Marks the stripe members that lost a block the layout gives them (see `stripe`).
fn reconcile(meta: &mut ImageMeta) {
    if let Some(stripe) = meta.stripe.as_mut() {
        stripe.reconcile(&meta.table);
    }
}

/// Removes the copy at `at` from every block of `range`; refused, with nothing changed, when a
/// block would be left without an in-sync copy. Returns the blocks that had a copy there.
pub fn remove(disk: &Disk, range: BlockRange, at: &Placement) -> Result<Vec<u64>, PlacementError> {
    // `remove_from` changes nothing when it fails, so its error rides inside a saved no-change.
    disk.update_meta(|meta| Ok(remove_from(meta, range, at)))
        .map_err(PlacementError::Save)?
}

/// [`remove`] on a metadata value; on an error, `meta` is left as it was.
fn remove_from(
    meta: &mut ImageMeta,
    range: BlockRange,
    at: &Placement,
) -> Result<Vec<u64>, PlacementError> {
    let mut had = Vec::new();
    for block in range.iter() {
        let locations = meta.table.locations(block).unwrap_or(&[]);
        if !locations.iter().any(|l| l.at(at)) {
            continue;
        }
        if !locations.iter().any(|l| l.synced && !l.at(at)) {
            return Err(PlacementError::LastSyncedCopy(block));
        }
        had.push(block);
    }
    // `update` changes nothing when it fails (a block left with no location).
    meta.table
        .update(range, |locations| locations.retain(|l| !l.at(at)))?;
    reconcile(meta);
    Ok(had)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{NodeId, Tier};
    use crate::stripe::{Stripe, StripeSpec};

    fn at(node: &str) -> Placement {
        Placement {
            node: node.parse().unwrap(),
            tier: Tier::Volume,
        }
    }

    /// Six blocks striped over a, b, c with two copies: block i on members i mod 3 and the next.
    fn striped() -> ImageMeta {
        let stripe = Stripe::new(&StripeSpec {
            members: vec![at("a"), at("b"), at("c")],
            width: None,
            copies: Some(2),
        })
        .unwrap();
        let name = "s".parse().unwrap();
        ImageMeta::striped(name, NodeId::local(), 6 * 4096, 4096, false, stripe).unwrap()
    }

    fn holders(meta: &ImageMeta, block: u64) -> Vec<String> {
        let locations = meta.table.locations(block).unwrap();
        locations.iter().map(|l| l.node.to_string()).collect()
    }

    fn all(meta: &ImageMeta) -> BlockRange {
        BlockRange::new(0, meta.blocks()).unwrap()
    }

    /// Removing a member's copies marks it incomplete in the same change; replacing it
    /// gives the new member exactly the blocks the layout places on the old one, and its
    /// place in the stripe.
    #[test]
    fn a_member_is_removed_then_replaced() {
        let mut meta = striped();
        let range = all(&meta);
        assert_eq!(holders(&meta, 1), ["b", "c"]);
        let had = remove_from(&mut meta, range, &at("b")).unwrap();
        assert_eq!(had, [0, 1, 3, 4]);
        let stripe = meta.stripe.clone().unwrap();
        let incomplete: Vec<bool> = stripe.members().iter().map(|m| m.incomplete).collect();
        assert_eq!(incomplete, [false, true, false]);
        let added = replace_in(&mut meta, range, &at("b"), &at("d")).unwrap();
        assert_eq!(added, 4);
        assert_eq!(holders(&meta, 1), ["c", "d"]);
        assert_eq!(holders(&meta, 2), ["c", "a"]);
        let stripe = meta.stripe.clone().unwrap();
        assert_eq!(stripe.members()[1].at, at("d"));
        assert!(stripe.members().iter().all(|m| !m.incomplete));
        let new = meta
            .table
            .locations(1)
            .unwrap()
            .iter()
            .find(|l| l.at(&at("d")));
        assert!(
            new.is_some_and(|l| !l.synced),
            "a new copy starts out of sync"
        );
    }

    /// A replacement while the old member still holds its copies keeps them (they go with
    /// `location rm` once the new ones are in sync); the last in-sync copy is still guarded.
    #[test]
    fn replace_keeps_the_old_copies_and_rm_is_guarded() {
        let mut meta = striped();
        let range = all(&meta);
        replace_in(&mut meta, range, &at("a"), &at("d")).unwrap();
        assert_eq!(holders(&meta, 0), ["a", "b", "d"]);
        assert_eq!(meta.stripe.as_ref().unwrap().members()[0].at, at("d"));
        remove_from(&mut meta, range, &at("a")).unwrap();
        assert!(meta
            .stripe
            .as_ref()
            .unwrap()
            .members()
            .iter()
            .all(|m| !m.incomplete));
        // Block 0 now has b in sync and d out of sync: b cannot go.
        let before = meta.clone();
        let err = remove_from(&mut meta, range, &at("b")).unwrap_err();
        assert!(matches!(err, PlacementError::LastSyncedCopy(0)), "{err}");
        assert_eq!(meta, before);
    }

    #[test]
    fn bad_replacements_are_refused_and_change_nothing() {
        let mut meta = striped();
        let range = all(&meta);
        let before = meta.clone();
        let err = replace_in(&mut meta, range, &at("a"), &at("c")).unwrap_err();
        assert!(err.to_string().contains("named twice"), "{err}");
        let err = replace_in(&mut meta, range, &at("a"), &at("a")).unwrap_err();
        assert!(matches!(err, PlacementError::ReplaceSelf(_)), "{err}");
        let err = replace_in(&mut meta, range, &at("x"), &at("d")).unwrap_err();
        assert!(
            matches!(err, PlacementError::NothingToReplace { .. }),
            "{err}"
        );
        assert_eq!(meta, before);
    }

    proptest::proptest! {
        /// Whatever a member lost before, replacing it over the whole image gives the new
        /// member a copy of exactly the blocks the layout places on that slot, moves the slot,
        /// leaves every other block alone, and leaves no member incomplete.
        #[test]
        fn a_replacement_restores_the_layout(
            members in 2usize..6,
            width in 1u64..4,
            copies in 2u32..4,
            blocks in 1u64..40,
            victim in 0usize..6,
            lost_from in 0u64..40,
        ) {
            let copies = copies.min(members as u32);
            let at_i = |i: usize| at(&format!("n{i}"));
            let stripe = Stripe::new(&StripeSpec {
                members: (0..members).map(at_i).collect(),
                width: Some(width),
                copies: Some(copies),
            })
            .unwrap();
            let name = "p".parse().unwrap();
            let size = blocks * 4096;
            let mut meta =
                ImageMeta::striped(name, NodeId::local(), size, 4096, false, stripe).unwrap();
            let (victim, new) = (at_i(victim % members), at("spare"));
            let lost = BlockRange::new(lost_from % blocks, blocks).unwrap();
            remove_from(&mut meta, lost, &victim).unwrap();
            let before = meta.clone();
            let range = all(&meta);
            replace_in(&mut meta, range, &victim, &new).unwrap();
            let stripe = meta.stripe.clone().unwrap();
            let slot = stripe.member_at(&new).unwrap();
            proptest::prop_assert_eq!(before.stripe.unwrap().member_at(&victim), Some(slot));
            proptest::prop_assert!(stripe.members().iter().all(|m| !m.incomplete));
            for b in 0..blocks {
                let now = meta.table.locations(b).unwrap();
                let was = before.table.locations(b).unwrap();
                let placed = stripe.places(b, slot);
                proptest::prop_assert_eq!(now.iter().any(|l| l.at(&new)), placed);
                proptest::prop_assert_eq!(&now[..was.len()], was, "block {} kept its copies", b);
                proptest::prop_assert_eq!(now.len(), was.len() + usize::from(placed));
            }
        }
    }

    /// A stripe wider than the image leaves a member without blocks: replacing it still
    /// moves its place (and copies nothing).
    #[test]
    fn a_member_without_blocks_can_be_replaced() {
        let stripe = Stripe::new(&StripeSpec {
            members: vec![at("a"), at("b"), at("c"), at("d")],
            width: None,
            copies: Some(2),
        })
        .unwrap();
        let name = "w".parse().unwrap();
        let mut meta =
            ImageMeta::striped(name, NodeId::local(), 2 * 4096, 4096, false, stripe).unwrap();
        let range = all(&meta);
        assert_eq!(replace_in(&mut meta, range, &at("d"), &at("e")).unwrap(), 0);
        assert_eq!(meta.stripe.as_ref().unwrap().members()[3].at, at("e"));
        let err = replace_in(&mut meta, range, &at("d"), &at("f")).unwrap_err();
        assert!(
            matches!(err, PlacementError::NothingToReplace { .. }),
            "{err}"
        );
    }

    /// Part of a member's blocks: the new copies go there, the stripe keeps its member.
    #[test]
    fn a_partial_replacement_keeps_the_member() {
        let mut meta = striped();
        let added = replace_in(
            &mut meta,
            BlockRange::new(0, 2).unwrap(),
            &at("a"),
            &at("d"),
        );
        assert_eq!(added.unwrap(), 1);
        assert_eq!(holders(&meta, 0), ["a", "b", "d"]);
        assert_eq!(holders(&meta, 1), ["b", "c"]);
        assert_eq!(meta.stripe.as_ref().unwrap().members()[0].at, at("a"));
    }
}
