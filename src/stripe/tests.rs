//! Stripe placement: the layout's promises as properties (exactly K copies on distinct members,
//! balance over a full stripe, width and member order, a pure function), and the checks.

use super::*;
use crate::image::Tier;
use proptest::prelude::*;

fn member(i: usize) -> Placement {
    Placement {
        node: format!("n{i}").parse().unwrap(),
        tier: if i.is_multiple_of(2) {
            Tier::Volume
        } else {
            Tier::Ram
        },
    }
}

fn stripe(members: usize, width: u64, copies: u32) -> Stripe {
    Stripe::new(&StripeSpec {
        members: (0..members).map(member).collect(),
        width: Some(width),
        copies: Some(copies),
    })
    .unwrap()
}

/// Any valid (members, width, copies).
fn layouts() -> impl Strategy<Value = (usize, u64, u32)> {
    (1usize..=8, 1u64..=16).prop_flat_map(|(m, w)| (Just(m), Just(w), 1u32..=m as u32))
}

proptest! {
    /// Every block has exactly K copies, on K distinct members, and the table built for a
    /// new image says the same.
    #[test]
    fn every_block_has_k_copies_on_distinct_members(
        (m, w, k) in layouts(),
        blocks in 1u64..300,
    ) {
        let s = stripe(m, w, k);
        let table = s.table(blocks).unwrap();
        for b in 0..blocks {
            let mut on: Vec<usize> = s.members_of(b).collect();
            prop_assert_eq!(on.len(), k as usize);
            on.sort_unstable();
            on.dedup();
            prop_assert_eq!(on.len(), k as usize, "block {} has two copies on one member", b);
            let locations = table.locations(b).unwrap();
            prop_assert_eq!(locations, &s.locations(b)[..]);
            for (l, i) in locations.iter().zip(s.members_of(b)) {
                prop_assert!(l.at(&member(i)) && l.synced);
            }
        }
    }

    /// Any M*N consecutive blocks (a full stripe, from anywhere) put exactly K*N copies on
    /// each member; any prefix of the image is balanced within one stripe unit per copy.
    #[test]
    fn member_load_is_balanced(
        (m, w, k) in layouts(),
        start in 0u64..10_000,
        prefix in 1u64..500,
    ) {
        let s = stripe(m, w, k);
        let mut load = vec![0u64; m];
        for b in start..start + m as u64 * w {
            for i in s.members_of(b) {
                load[i] += 1;
            }
        }
        prop_assert!(load.iter().all(|&n| n == u64::from(k) * w), "{:?}", load);
        let mut load = vec![0u64; m];
        for b in 0..prefix {
            for i in s.members_of(b) {
                load[i] += 1;
            }
        }
        let (lo, hi) = (load.iter().min().unwrap(), load.iter().max().unwrap());
        prop_assert!(hi - lo <= u64::from(k) * w, "{:?}", load);
    }

    /// A stripe unit's blocks share their members; unit u starts on member u mod M and its
    /// further copies go on the next members in order.
    #[test]
    fn width_and_member_order_are_respected(
        (m, w, k) in layouts(),
        block in 0u64..1_000_000,
    ) {
        let s = stripe(m, w, k);
        let unit = block / w;
        let on: Vec<usize> = s.members_of(block).collect();
        let first: Vec<usize> = s.members_of(unit * w).collect();
        prop_assert_eq!(&on, &first);
        let expected: Vec<usize> =
            (0..k as usize).map(|c| (unit as usize % m + c) % m).collect();
        prop_assert_eq!(on, expected);
        // The next unit moves on by one member.
        let next: Vec<usize> = s.members_of((unit + 1) * w).collect();
        prop_assert_eq!(next[0], (unit as usize + 1) % m);
    }

    /// Placement is a pure function: the same answer for the same block every time, from a
    /// stripe read back from its JSON, and whatever the image's size.
    #[test]
    fn placement_is_a_pure_function(
        (m, w, k) in layouts(),
        blocks in 1u64..200,
        extra in 1u64..200,
    ) {
        let s = stripe(m, w, k);
        let back: Stripe = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        prop_assert_eq!(&back, &s);
        let small = s.table(blocks).unwrap();
        let large = s.table(blocks + extra).unwrap();
        for b in 0..blocks {
            let once: Vec<usize> = s.members_of(b).collect();
            let again: Vec<usize> = back.members_of(b).collect();
            prop_assert_eq!(&once, &again);
            prop_assert_eq!(small.locations(b), large.locations(b));
        }
    }

    /// After a member's copies of some blocks go, reconcile marks exactly that member
    /// incomplete; giving them back clears the mark.
    #[test]
    fn reconcile_follows_the_table(
        (m, w, k) in layouts(),
        blocks in 1u64..100,
        victim in 0usize..8,
        from in 0u64..100,
    ) {
        prop_assume!(k >= 2);
        let victim = victim % m;
        let mut s = stripe(m, w, k);
        let mut table = s.table(blocks).unwrap();
        s.reconcile(&table);
        prop_assert!(s.members().iter().all(|x| !x.incomplete));
        let from = from % blocks;
        let range = BlockRange::new(from, blocks).unwrap();
        let at = member(victim);
        table.update(range, |l| l.retain(|x| !x.at(&at))).unwrap();
        s.reconcile(&table);
        let lost = range.iter().any(|b| s.places(b, victim));
        for (i, x) in s.members().iter().enumerate() {
            prop_assert_eq!(x.incomplete, i == victim && lost);
        }
        table.update(range, |l| {
            if !l.iter().any(|x| x.at(&at)) {
                l.push(Location { node: at.node.clone(), tier: at.tier, synced: false });
            }
        }).unwrap();
        s.reconcile(&table);
        prop_assert!(s.members().iter().all(|x| !x.incomplete));
    }
}

#[test]
fn the_issue_example_places_block_i_on_member_i_mod_3() {
    let s = stripe(3, 1, 1);
    let on: Vec<usize> = (0..7).flat_map(|b| s.members_of(b)).collect();
    assert_eq!(on, [0, 1, 2, 0, 1, 2, 0]);
    let s = stripe(3, 2, 2);
    let on: Vec<Vec<usize>> = (0..7).map(|b| s.members_of(b).collect()).collect();
    assert_eq!(
        on,
        [
            vec![0, 1],
            vec![0, 1],
            vec![1, 2],
            vec![1, 2],
            vec![2, 0],
            vec![2, 0],
            vec![0, 1]
        ]
    );
}

#[test]
fn bad_stripes_are_refused_with_what_is_wrong() {
    let spec = |members: Vec<Placement>, width, copies| StripeSpec {
        members,
        width,
        copies,
    };
    let three = vec![member(0), member(1), member(2)];
    assert_eq!(
        Stripe::new(&spec(three.clone(), None, Some(4))),
        Err(StripeError::TooManyCopies {
            copies: 4,
            members: 3
        })
    );
    assert_eq!(
        Stripe::new(&spec(vec![member(0), member(1), member(0)], None, None)),
        Err(StripeError::Repeated(member(0)))
    );
    assert_eq!(
        Stripe::new(&spec(vec![], None, None)),
        Err(StripeError::NoMembers)
    );
    assert_eq!(
        Stripe::new(&spec(three.clone(), Some(0), None)),
        Err(StripeError::NoWidth)
    );
    assert_eq!(
        Stripe::new(&spec(three.clone(), None, Some(0))),
        Err(StripeError::NoCopies)
    );
    let many: Vec<Placement> = (0..=MAX_MEMBERS).map(member).collect();
    assert_eq!(
        Stripe::new(&spec(many, None, None)),
        Err(StripeError::TooManyMembers(MAX_MEMBERS + 1))
    );
    let s = Stripe::new(&spec(three, None, Some(2))).unwrap();
    assert_eq!((s.width(), s.copies()), (1, 2));
    let msg = StripeError::TooManyCopies {
        copies: 4,
        members: 3,
    }
    .to_string();
    assert!(
        msg.contains("--copies 4") && msg.contains("3 members"),
        "{msg}"
    );
}

/// A stripe read from metadata is checked like one from an operator: a hand-edited file
/// naming a member twice is refused, not served.
#[test]
fn stored_stripes_are_checked_when_read() {
    let s = stripe(3, 2, 2);
    let text = serde_json::to_string(&s).unwrap();
    assert!(
        text.contains("\"width\":2") && !text.contains("incomplete"),
        "{text}"
    );
    let bad = text.replace("n2", "n0");
    let err = serde_json::from_str::<Stripe>(&bad).unwrap_err();
    assert!(err.to_string().contains("named twice"), "{err}");
    let bad = text.replace("\"copies\":2", "\"copies\":5");
    assert!(serde_json::from_str::<Stripe>(&bad).is_err());
}

#[test]
fn replace_moves_a_member_and_refuses_a_repeat() {
    let mut s = stripe(3, 1, 2);
    let d = member(7);
    assert_eq!(s.replace(&member(1), &d), Ok(true));
    assert_eq!(s.members()[1].at, d);
    assert_eq!(s.replace(&member(1), &member(8)), Ok(false));
    assert_eq!(
        s.replace(&member(0), &member(2)),
        Err(StripeError::Repeated(member(2)))
    );
    assert_eq!(
        s.blocks_of(&d, BlockRange::new(0, 6).unwrap()),
        [0, 1, 3, 4]
    );
}
