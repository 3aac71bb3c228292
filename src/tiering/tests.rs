//! The mover on a real single-node daemon: blocks promoted and demoted with their data
//! intact, the budget kept, and the operator's location change winning.

use std::sync::Arc;
use std::time::Duration;

use super::mover::Mover;
use super::{TierMode, TieringConfig};
use crate::config::Config;
use crate::control::protocol::Request;
use crate::daemon::Daemon;
use crate::disk::Disk;
use crate::image::{Placement, Tier};
use crate::qos::QosUpdate;
use crate::store::TierDirs;

const BLOCK: u64 = 1 << 20;
const BLOCKS: u64 = 6;

fn daemon(root: &std::path::Path) -> Arc<Daemon> {
    let config = Config {
        run_dir: root.join("run"),
        dirs: TierDirs {
            ram: root.join("ram"),
            volume: root.join("vol"),
        },
        node: "a".parse().unwrap(),
        use_uring: false,
        cluster: None,
        failure_timeout: Duration::from_secs(5),
        metrics_listen: None,
        socket_access: None,
        cache_budgets: Default::default(),
        tiering: Default::default(),
    };
    std::fs::create_dir_all(&config.run_dir).unwrap();
    Arc::new(Daemon::start(config, None, None).unwrap())
}

fn auto_image(daemon: &Daemon) -> Arc<Disk> {
    let create = Request::ImageCreate {
        name: "img".parse().unwrap(),
        size: BLOCKS * BLOCK,
        block_size: BLOCK,
        tier: Tier::Volume,
        read_only: false,
        at: vec![],
        qos: QosUpdate {
            tiering: Some(TierMode::Auto),
            ..QosUpdate::default()
        },
        stripe: None,
    };
    daemon.apply(create, &mut |_, _| {}).unwrap();
    daemon.find(&"img".parse().unwrap()).unwrap()
}

fn pattern(block: u64) -> Vec<u8> {
    (0..BLOCK).map(|i| (i as u8) ^ (block as u8 * 37)).collect()
}

/// The block's data, read from the one in-sync copy this node has, and that copy's tier.
fn read_here(disk: &Disk, block: u64) -> (Tier, Vec<u8>) {
    let meta = disk.meta();
    let here: Vec<_> = meta
        .table
        .locations(block)
        .unwrap()
        .iter()
        .filter(|l| &l.node == disk.me())
        .cloned()
        .collect();
    assert_eq!(here.len(), 1, "block {block}: one copy here, not {here:?}");
    assert!(here[0].synced);
    let data = disk.blocks().read_block(here[0].tier, block).unwrap();
    (here[0].tier, data.unwrap_or_default())
}

fn tiers(disk: &Disk) -> Vec<Tier> {
    (0..BLOCKS).map(|b| read_here(disk, b).0).collect()
}

fn heat(disk: &Disk, block: u64, n: u32) {
    for _ in 0..n {
        disk.tiering().heat().touch(block);
    }
}

#[test]
fn hot_blocks_move_to_ram_within_the_budget_and_back_when_cold() {
    let root = tempfile::tempdir().unwrap();
    let daemon = daemon(root.path());
    let disk = auto_image(&daemon);
    for block in 0..BLOCKS {
        disk.blocks()
            .replace_block(Tier::Volume, block, Some(&pattern(block)))
            .unwrap();
    }
    let config = TieringConfig {
        ram_budget: 2 * BLOCK,
        rate: 1 << 30,
        interval: Duration::from_secs(10),
        decay: Duration::from_secs(3600),
    };
    let mut mover = Mover::new(config);
    let disks = [disk.clone()];
    let peers = daemon.peers().clone();
    heat(&disk, 1, 100);
    heat(&disk, 4, 50);
    heat(&disk, 5, 20);
    heat(&disk, 2, 2); // too lukewarm to earn RAM
    let report = mover.round(&disks, &*peers);
    assert_eq!((report.promoted, report.failed), (2, 0), "{report:?}");
    assert!(report.ram_used <= config.ram_budget);
    use Tier::{Ram, Volume};
    assert_eq!(tiers(&disk), [Volume, Ram, Volume, Volume, Ram, Volume]);
    for block in 0..BLOCKS {
        assert_eq!(read_here(&disk, block).1, pattern(block), "block {block}");
    }
    assert!(
        disk.blocks().read_block(Volume, 1).unwrap().is_none(),
        "the volume copy's file is freed"
    );
    // Nothing changes when asked again with the same heat.
    assert!(!mover.round(&disks, &*peers).moved());
    // Block 5 gets much hotter than block 4: they swap, and RAM never holds more than 2.
    heat(&disk, 5, 200);
    let report = mover.round(&disks, &*peers);
    assert_eq!((report.promoted, report.demoted), (1, 1), "{report:?}");
    assert_eq!(tiers(&disk), [Volume, Ram, Volume, Volume, Volume, Ram]);
    assert_eq!(read_here(&disk, 4).1, pattern(4));
    assert_eq!(read_here(&disk, 5).1, pattern(5));
    let figures = disk.tiering().figures(&disk.meta(), disk.me());
    assert_eq!((figures.promotions, figures.demotions), (3, 1));
    assert_eq!(figures.counts.ram, 2);
    assert_eq!(figures.bytes_moved, 4 * BLOCK);
    // Everything goes cold: with decay due every round, the counts halve to nothing and
    // the blocks go back to the volume.
    let mut mover = Mover::new(TieringConfig {
        decay: Duration::ZERO,
        ..config
    });
    for _ in 0..10 {
        mover.round(&disks, &*peers);
    }
    assert_eq!(tiers(&disk), [Volume; BLOCKS as usize]);
    for block in 0..BLOCKS {
        assert_eq!(read_here(&disk, block).1, pattern(block), "block {block}");
    }
}

/// A crash between a move's steps leaves two copies here: the next round finishes the move
/// or undoes it, never dropping the only in-sync copy.
#[test]
fn half_done_moves_are_tidied() {
    let root = tempfile::tempdir().unwrap();
    let daemon = daemon(root.path());
    let disk = auto_image(&daemon);
    disk.blocks()
        .replace_block(Tier::Volume, 0, Some(&pattern(0)))
        .unwrap();
    let here = |tier| Placement {
        node: disk.me().clone(),
        tier,
    };
    let one = crate::image::BlockRange::new(0, 1).unwrap();
    // Crashed after adding the RAM copy, before syncing it: the copy is out of sync.
    crate::placement::add(&disk, one, &here(Tier::Ram)).unwrap();
    let mut mover = Mover::new(TieringConfig::default());
    let report = mover.round(std::slice::from_ref(&disk), &*daemon.peers().clone());
    assert_eq!(report.tidied, 1, "{report:?}");
    assert_eq!(read_here(&disk, 0), (Tier::Volume, pattern(0)));
}

/// An operator's `location add` on an auto image turns auto off; the mover then leaves the
/// image alone however hot its blocks are.
#[test]
fn the_operator_wins() {
    let root = tempfile::tempdir().unwrap();
    let daemon = daemon(root.path());
    let disk = auto_image(&daemon);
    disk.blocks()
        .replace_block(Tier::Volume, 3, Some(&pattern(3)))
        .unwrap();
    let add = Request::LocationAdd {
        name: "img".parse().unwrap(),
        blocks: Some(crate::image::BlockRange::new(3, 4).unwrap()),
        at: "a:ram".parse().unwrap(),
        replace: None,
    };
    let reply = daemon.apply(add, &mut |_, _| {}).unwrap();
    assert!(reply["tiering"].as_str().unwrap().starts_with("manual"));
    assert_eq!(disk.meta().qos.tiering, None);
    heat(&disk, 0, 100);
    let mut mover = Mover::new(TieringConfig {
        ram_budget: 1 << 30,
        ..TieringConfig::default()
    });
    let report = mover.round(std::slice::from_ref(&disk), &*daemon.peers().clone());
    assert!(!report.moved(), "{report:?}");
    assert!(
        !disk.tiering().heat().is_on(),
        "a manual image is not counted"
    );
}
