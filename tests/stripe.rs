//! Striped images through the real CLI on one node, whose two tiers are two stripe members
//! (`local:ram`, `local:volume`): the layout as `image info` shows it, data written through a
//! frontend landing on the member the layout names, the refusals, and location commands per
//! member (remove one member's copies, put them back, replace a member).

mod common;

use common::daemon::Daemon;
use common::TestDir;
use cormorant_frontend::{BlkClient, ClientOptions};
use serde_json::Value;

const S_OK: u8 = 0;
const BLOCK: u64 = 256 << 10;

/// The nodes:tiers holding `block`, in table order.
fn holders(info: &Value, block: usize) -> Vec<String> {
    info["blocks"][block]["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            format!(
                "{}:{}",
                l["node"].as_str().unwrap(),
                l["tier"].as_str().unwrap()
            )
        })
        .collect()
}

fn incomplete(info: &Value) -> Vec<bool> {
    info["stripe"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["incomplete"].as_bool().unwrap_or(false))
        .collect()
}

#[test]
fn create_refuses_bad_stripes_with_clear_errors() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    let create = ["image", "create", "s", "--size", "4M"];
    for (extra, says) in [
        (
            vec!["--stripe", "local:ram,local:volume", "--copies", "3"],
            "--copies 3 is more than the stripe's 2 members",
        ),
        (
            vec!["--stripe", "local:ram,local:ram"],
            "local:ram is named twice",
        ),
        (
            vec!["--stripe", "local:ram,elsewhere:volume"],
            "node 'elsewhere' is neither this node nor a peer",
        ),
        (
            vec!["--stripe", "local:ram", "--at", "local:volume"],
            "cannot be used with",
        ),
        (vec!["--stripe-width", "2"], "--stripe"),
        (vec!["--copies", "2"], "--stripe"),
        (
            vec!["--stripe", "local:ram,local:volume", "--stripe-width", "0"],
            "at least 1 block",
        ),
        (
            vec!["--stripe", "local:ram,local:volume", "--copies", "0"],
            "at least 1",
        ),
        (vec!["--stripe", "local:disk"], "unknown tier"),
    ] {
        let args: Vec<&str> = create.iter().copied().chain(extra.clone()).collect();
        let out = daemon.cli_raw(&args);
        assert!(!out.status.success(), "{extra:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
    assert_eq!(daemon.cli(&["image", "list"]), serde_json::json!([]));
}

/// Width 2, one copy: blocks 0-1 on ram, 2-3 on volume, and so on; a write lands in the
/// member's tier directory and nowhere else; the stripe is in `image info` and survives a
/// restart.
#[test]
fn blocks_land_on_the_member_the_layout_names() {
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    let created = daemon.cli(&[
        "image",
        "create",
        "s",
        "--size",
        "2M",
        "--block-size",
        "256K",
        "--stripe",
        "local:ram,local:volume",
        "--stripe-width",
        "2",
    ]);
    assert_eq!(created["stripe"]["width"], 2);
    assert_eq!(created["stripe"]["copies"], 1);
    assert_eq!(created["stripe"]["members"][1]["at"], "local:volume");
    let info = daemon.cli(&["image", "info", "s"]);
    for block in 0..8 {
        let member = ["local:ram", "local:volume"][(block / 2) % 2];
        assert_eq!(holders(&info, block), [member], "block {block}");
    }
    let mut client = BlkClient::connect(daemon.socket("s"), &ClientOptions::default()).unwrap();
    let data: Vec<u8> = (0..8 * BLOCK)
        .map(|i| (i / BLOCK * 31 + i % 251) as u8)
        .collect();
    assert_eq!(client.write(0, 0, &data).unwrap(), S_OK);
    assert_eq!(client.flush(0).unwrap(), S_OK);
    for block in 0..8u64 {
        let (here, not) = if (block / 2) % 2 == 0 {
            ("ram", "volume")
        } else {
            ("volume", "ram")
        };
        assert!(
            daemon.block_file(here, "s", block).exists(),
            "block {block}"
        );
        assert!(
            !daemon.block_file(not, "s", block).exists(),
            "block {block}"
        );
    }
    drop(client);
    daemon.restart();
    let again = daemon.cli(&["image", "info", "s"]);
    assert_eq!(again["stripe"], info["stripe"]);
    let mut client = BlkClient::connect(daemon.socket("s"), &ClientOptions::default()).unwrap();
    let (status, read) = client.read(0, 0, data.len() as u32).unwrap();
    assert_eq!(status, S_OK);
    assert!(
        read == data,
        "the striped image reads back what was written"
    );
}

/// Two copies over two members: removing one member's copies leaves it incomplete in the
/// stripe (the other member holds every block in sync); adding them back and syncing makes
/// it whole; removing the last in-sync copy is refused as for any image; a replacement
/// must name a member or a holder and may not repeat one.
#[test]
fn location_commands_work_per_member() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&[
        "image",
        "create",
        "s",
        "--size",
        "1M",
        "--block-size",
        "256K",
        "--stripe",
        "local:ram,local:volume",
        "--copies",
        "2",
    ]);
    let info = daemon.cli(&["image", "info", "s"]);
    assert_eq!(holders(&info, 0), ["local:ram", "local:volume"]);
    assert_eq!(holders(&info, 1), ["local:volume", "local:ram"]);
    let mut client = BlkClient::connect(daemon.socket("s"), &ClientOptions::default()).unwrap();
    let data: Vec<u8> = (0..4 * BLOCK).map(|i| (i % 253) as u8).collect();
    assert_eq!(client.write(0, 0, &data).unwrap(), S_OK);

    let removed = daemon.cli(&["location", "rm", "s", "--at", "local:ram"]);
    assert_eq!(removed["removed"], 4);
    assert_eq!(incomplete(&removed), [true, false]);
    let info = daemon.cli(&["image", "info", "s"]);
    assert_eq!(incomplete(&info), [true, false]);
    assert_eq!(holders(&info, 2), ["local:volume"]);
    assert!(!daemon.block_file("ram", "s", 2).exists(), "its files go");
    let refused = daemon.cli_raw(&["location", "rm", "s", "--at", "local:volume"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no in-sync copy"));

    for (bad, says) in [
        (
            vec!["--at", "local:volume", "--replace", "local:ram"],
            "named twice",
        ),
        (
            vec!["--at", "local:ram", "--replace", "local:ram"],
            "replace itself",
        ),
    ] {
        let args: Vec<&str> = ["location", "add", "s"].into_iter().chain(bad).collect();
        let out = daemon.cli_raw(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }

    let added = daemon.cli(&["location", "add", "s", "--at", "local:ram"]);
    assert_eq!(added["added"], 4);
    assert_eq!(incomplete(&added), [false, false]);
    daemon.cli(&["sync", "s"]);
    let info = daemon.cli(&["image", "info", "s"]);
    let synced = info["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["locations"].as_array().unwrap().iter())
        .filter(|l| l["synced"] == true)
        .count();
    assert_eq!(synced, 8, "{info}");
    // Back on both members: the RAM copies alone serve the data.
    daemon.cli(&["location", "rm", "s", "--at", "local:volume"]);
    let (status, read) = client.read(0, 0, data.len() as u32).unwrap();
    assert_eq!(status, S_OK);
    assert!(read == data);
}

/// In a cluster the stripe lives in etcd: every node's `image info` shows it, a replacement
/// changes it there with the locations, a restarted owner reads it back, and a take-over by
/// another node leaves the blocks on the stripe's members (other images gather on the new
/// owner).
#[test]
fn in_a_cluster_the_stripe_is_kept_in_etcd_and_survives_a_take_over() {
    if !common::tools_available(&["etcd"]) {
        return;
    }
    let dir = TestDir::new();
    let (_etcd, mut cluster) = common::etcd_cluster(dir.path(), 3);
    cluster.nodes[0].cli(&[
        "image",
        "create",
        "st",
        "--size",
        "4M",
        "--block-size",
        "256K",
        "--stripe",
        "a:volume,b:volume,c:volume",
        "--stripe-width",
        "2",
        "--copies",
        "2",
    ]);
    let on_c = cluster.nodes[2].cli(&["image", "info", "st"]);
    assert_eq!(on_c["stripe"]["width"], 2, "{on_c}");
    assert_eq!(holders(&on_c, 2), ["b:volume", "c:volume"]);
    let data: Vec<u8> = (0..16 * BLOCK).map(|i| (i % 241) as u8).collect();
    {
        let a = &cluster.nodes[0];
        let mut client = BlkClient::connect(a.socket("st"), &ClientOptions::default()).unwrap();
        assert_eq!(client.write(0, 0, &data).unwrap(), S_OK);
        assert_eq!(client.flush(0).unwrap(), S_OK);
    }
    assert!(cluster.nodes[2].block_file("volume", "st", 2).exists());
    assert!(!cluster.nodes[2].block_file("volume", "st", 0).exists());

    // c's volume member moves to c's RAM tier: a replacement within one node, through etcd.
    let a = &cluster.nodes[0];
    a.cli(&[
        "location",
        "add",
        "st",
        "--at",
        "c:ram",
        "--replace",
        "c:volume",
    ]);
    a.cli(&["sync", "st"]);
    a.cli(&["location", "rm", "st", "--at", "c:volume"]);
    let on_b = cluster.nodes[1].cli(&["image", "info", "st"]);
    assert_eq!(on_b["stripe"]["members"][2]["at"], "c:ram", "{on_b}");
    assert_eq!(holders(&on_b, 2), ["b:volume", "c:ram"]);
    assert_eq!(incomplete(&on_b), [false, false, false]);

    cluster.nodes[0].restart();
    let again = cluster.nodes[0].cli(&["image", "info", "st"]);
    assert_eq!(again["stripe"], on_b["stripe"]);

    // b takes the image over when a frontend starts on it: the blocks stay where they are.
    let b = &cluster.nodes[1];
    assert!(common::wait_until(
        std::time::Duration::from_secs(10),
        || { b.cli_raw(&["image", "adopt", "st"]).status.success() }
    ));
    let mut client = BlkClient::connect(b.socket("st"), &ClientOptions::default()).unwrap();
    let (status, read) = client.read(0, 0, data.len() as u32).unwrap();
    assert_eq!(status, S_OK);
    assert!(
        read == data,
        "the striped image reads back on its new owner"
    );
    assert!(common::wait_until(
        std::time::Duration::from_secs(5),
        || { b.log().contains("striped, so its blocks stay") }
    ));
    let info = b.cli(&["image", "info", "st"]);
    assert_eq!(info["owner"], "b");
    assert_eq!(info["stripe"], on_b["stripe"]);
    for block in 0..16 {
        assert_eq!(
            holders(&info, block),
            holders(&on_b, block),
            "block {block}"
        );
    }
}
