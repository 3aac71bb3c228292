//! packaging/cormorant.service: `systemd-analyze verify` accepts it, its hardening stays at an
//! exposure systemd rates OK, `serve` accepts its command line, and the settings the daemon
//! depends on are there (and the ones that would break it are not).
//!
//! No systemd needs to be running: `systemd-analyze` reads the file offline.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::daemon::BIN;
use common::{tools_available, TestDir};

const INSTALLED_BIN: &str = "/usr/local/bin/cormorant";

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/cormorant.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every value of `key=` in the unit (a key may be repeated).
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
        .collect()
}

fn value<'a>(unit: &'a str, key: &str) -> &'a str {
    match values(unit, key).as_slice() {
        [v] => v,
        other => panic!("{key}= should be set once, found {other:?}"),
    }
}

fn expect_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The unit with ExecStart pointing at the binary under test: verify insists that the program
/// exists. The copy keeps the name `cormorant.service`, which verify checks the unit type by.
fn unit_for_test(dir: &TestDir) -> std::path::PathBuf {
    let unit = unit_text();
    assert!(
        value(&unit, "ExecStart").starts_with(&format!("{INSTALLED_BIN} ")),
        "ExecStart should run {INSTALLED_BIN}"
    );
    let path = dir.join("cormorant.service");
    std::fs::write(&path, unit.replace(INSTALLED_BIN, BIN)).unwrap();
    path
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !tools_available(&["systemd-analyze"]) {
        return;
    }
    let dir = TestDir::new();
    let unit = unit_for_test(&dir);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    expect_success("systemd-analyze verify", &out);
    // verify reports some problems (unknown keys, bad values) as warnings with exit status 0.
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(warnings.trim().is_empty(), "verify warned:\n{warnings}");
}

#[test]
fn unit_hardening_is_rated_ok() {
    if !tools_available(&["systemd-analyze"]) {
        return;
    }
    let dir = TestDir::new();
    let unit = unit_for_test(&dir);
    // Exposure is 0 to 10, given to --threshold times ten; at or below 4.0 systemd says OK.
    // Today's unit rates 3.1: it runs as root, which costs the most.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=40", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    expect_success("systemd-analyze security --threshold=40", &out);
}

#[test]
fn unit_command_line_is_accepted_by_serve() {
    let unit = unit_text();
    let exec = value(&unit, "ExecStart");
    // The optional extra arguments come from /etc/default/cormorant; empty by default.
    let args: Vec<&str> = exec
        .split_whitespace()
        .skip(1)
        .filter(|a| *a != "$CORMORANT_SERVE_ARGS")
        .collect();
    assert_eq!(
        args,
        [
            "--run-dir",
            "/run/cormorant",
            "serve",
            "--ram-dir",
            "/dev/shm/cormorant",
            "--volume-dir",
            "/var/lib/cormorant"
        ],
        "ExecStart should name the default directories"
    );
    // --help after the arguments: clap checks every option before it, and nothing is served.
    let out = Command::new(BIN)
        .args(&args)
        .arg("--help")
        .output()
        .expect("run cormorant");
    expect_success("cormorant serve with the unit's arguments", &out);
}

#[test]
fn unit_keeps_what_the_daemon_needs() {
    let unit = unit_text();
    assert_eq!(value(&unit, "Type"), "simple");
    assert_eq!(value(&unit, "Restart"), "on-failure");
    // The directories ExecStart names: /run/cormorant and /var/lib/cormorant.
    assert_eq!(value(&unit, "RuntimeDirectory"), "cormorant");
    assert_eq!(value(&unit, "StateDirectory"), "cormorant");
    // QEMU (another user under libvirt) must reach the sockets in /run/cormorant.
    assert_eq!(value(&unit, "RuntimeDirectoryMode"), "0755");
    let nofile: u64 = value(&unit, "LimitNOFILE").parse().unwrap();
    assert!(
        nofile >= 65536,
        "LimitNOFILE {nofile}: every block file stays open"
    );
    // io_uring is outside @system-service: it must be allowed by name.
    let filter = values(&unit, "SystemCallFilter").join(" ");
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(filter.contains(call), "SystemCallFilter lacks {call}");
    }
    // A private /dev has its own /dev/shm, emptied at every stop: RAM-tier blocks would go.
    assert!(values(&unit, "PrivateDevices").iter().all(|v| *v == "no"));
    assert!(values(&unit, "ReadWritePaths").contains(&"/dev/shm"));
    // The daemon opens the files `image import` and `image export` name, wherever they are.
    for key in ["PrivateTmp", "ProtectHome"] {
        assert!(values(&unit, key).iter().all(|v| *v == "no"), "{key}=");
    }
    assert_ne!(value(&unit, "ProtectSystem"), "strict");
    // Unix sockets for QEMU and the control socket, TCP for peers and metrics.
    assert_eq!(
        value(&unit, "RestrictAddressFamilies"),
        "AF_UNIX AF_INET AF_INET6"
    );
}
