//! The benchmark harness must keep working: run `cormorant-bench --suite smoke` (about a second
//! per case, every kind of case once) and check that it wrote the JSON, the table and the plots,
//! with a Cormorant figure in every group. It measures nothing: the numbers are not checked.
//!
//! Needs qemu-storage-daemon, fio and qemu-system-x86_64 (scripts/setup.sh); without them it
//! skips with a note, except under CI, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const DAEMON: &str = env!("CARGO_BIN_EXE_cormorant");

/// The harness binary. It is another crate of the workspace (benches/harness), so cargo does not
/// build it for this package's tests: build it here with the cargo running us, in the same
/// profile (it lands beside the daemon's binary), so it is never stale.
fn bench_bin() -> PathBuf {
    let bin = Path::new(DAEMON).with_file_name("cormorant-bench");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "cormorant-bench", "--bin", "cormorant-bench"])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p cormorant-bench failed");
    }
    assert!(bin.exists(), "{} missing: build it", bin.display());
    bin
}

#[test]
fn smoke_suite_writes_results_table_and_plots() {
    if !common::tools_available(&["qemu-storage-daemon", "fio", "qemu-system-x86_64"]) {
        return;
    }
    let dir = common::TestDir::new();
    // The volume tier must be a disk file system, not the system temp dir (may be tmpfs).
    let volume = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("volume dir");
    let out = dir.join("out");
    let output = Command::new(bench_bin())
        .args(["--suite", "smoke", "--cormorant", DAEMON])
        .arg("--out")
        .arg(&out)
        .arg("--volume-dir")
        .arg(volume.path())
        .output()
        .expect("run cormorant-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "cormorant-bench failed:\n{stderr}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json"))
            .expect("results.json parses");
    let ms = json["measurements"].as_array().expect("measurements");
    for group in ["backend ram", "backend volume", "guest ram"] {
        let ours = ms
            .iter()
            .filter(|m| m["group"] == group && m["system"] == "cormorant")
            .count();
        assert!(ours > 0, "no cormorant result in {group}:\n{stderr}");
        assert!(
            ms.iter()
                .any(|m| m["group"] == group && m["system"] != "cormorant"),
            "nothing to compare with in {group}"
        );
    }
    assert!(
        ms.iter()
            .all(|m| m["result"]["ops"].as_u64().unwrap_or(0) > 0),
        "a case completed no request:\n{stderr}"
    );
    let figures = json["figures"].as_array().expect("figures");
    for name in [
        "idle guest",
        "idle connected client",
        "1 TiB thin image",
        "clones created and connected",
    ] {
        assert!(
            figures
                .iter()
                .any(|f| f["name"].as_str().unwrap_or("").contains(name)),
            "no figure for {name}"
        );
    }

    // One live migration per system (issue 11), unless the group was skipped with a note.
    let notes = json["notes"].as_array().expect("notes");
    let skipped = notes
        .iter()
        .any(|n| n.as_str().unwrap_or("").starts_with("migration: skipped"));
    for system in ["cormorant", "qsd-io_uring"] {
        assert!(
            skipped
                || figures.iter().any(|f| f["system"] == system
                    && f["name"] == "live-migration downtime, run 1"
                    && f["unit"] == "ms"),
            "no migration downtime for {system}: {notes:?}"
        );
    }

    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    assert!(md.contains("| backend ram | randread 4k qd32 x1 | qsd-io_uring |"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("### Ratios"), "the table is printed");
    for png in ["backend-ram-iops.png", "guest-ram-p50.png"] {
        assert_png(&out.join(png));
    }
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
}
