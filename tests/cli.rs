//! The control plane through the real CLI: image lifecycle, import and export (raw and qcow2),
//! bad input, and a clean SIGTERM.

mod common;

use std::io::Write;

use common::daemon::Daemon;
use common::{tools_available, TestDir};

#[test]
fn image_lifecycle_and_bad_input() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    let created = daemon.cli(&["image", "create", "disk0", "--size", "20G"]);
    assert_eq!(created["size"], 20u64 << 30);
    assert_eq!(created["block_size"], 4u64 << 20);
    assert_eq!(created["tier"], "ram");
    assert!(
        daemon.socket("disk0").exists(),
        "exported as soon as created"
    );

    let info = daemon.cli(&["image", "info", "disk0"]);
    assert_eq!(info["used_size"], 0, "thin: no space taken");
    let blocks = info["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 5120);
    assert_eq!(blocks[5119]["locations"][0]["tier"], "ram");
    assert_eq!(blocks[0]["locations"][0]["synced"], true);

    for bad in [
        vec!["image", "create", "../x", "--size", "1M"],
        vec!["image", "create", ".hidden", "--size", "1M"],
        vec!["image", "create", "ok", "--size", "12Q"],
        vec!["image", "create", "ok", "--size", "1000"],
        vec![
            "image",
            "create",
            "ok",
            "--size",
            "1M",
            "--block-size",
            "3M",
        ],
        vec!["image", "create", "ok", "--size", "1M", "--tier", "ssd"],
        vec!["image", "create", "disk0", "--size", "1M"],
        vec!["image", "info", "nope"],
        vec!["image", "rm", "nope"],
    ] {
        let out = daemon.cli_raw(&bad);
        assert!(!out.status.success(), "{bad:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.trim().is_empty(), "{bad:?} should say why");
        assert!(!err.contains("panicked"), "{bad:?}: {err}");
    }
    assert!(!dir.join("x").exists());

    daemon.cli(&["image", "rm", "disk0"]);
    assert!(!daemon.socket("disk0").exists());
    assert_eq!(daemon.cli(&["image", "list"]), serde_json::json!([]));
}

#[test]
fn garbage_on_the_control_socket_is_answered() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    for junk in [
        &b"{\"op\":\"image_explode\"}\n"[..],
        b"not json\n",
        b"{\"op\":\"image_info\",\"name\":\"../../etc\"}\n",
        &[0xff, 0xfe, b'\n'],
    ] {
        let mut s = UnixStream::connect(daemon.run_dir.join("control.sock")).unwrap();
        s.write_all(junk).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.starts_with("{\"error\""), "{line}");
    }
    // A request that never ends is cut off, and the daemon still answers afterwards.
    let mut s = UnixStream::connect(daemon.run_dir.join("control.sock")).unwrap();
    let _ = s.write_all(&vec![b'x'; 100_000]);
    drop(s);
    assert_eq!(daemon.cli(&["image", "list"]), serde_json::json!([]));
}

/// Random data with all-zero stretches, so thin import can be checked.
fn sample_file(path: &std::path::Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 3 == 1 {
            continue; // leave this MiB zero
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn import_and_export_raw_and_qcow2() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    let raw = dir.join("src.raw");
    let data = sample_file(&raw, 6 << 20);
    daemon.cli(&[
        "image",
        "import",
        "imp",
        raw.to_str().unwrap(),
        "--block-size",
        "1M",
        "--tier",
        "volume",
    ]);
    // MiB 1 and 4 are zero: their blocks were never written.
    assert!(daemon.block_file("volume", "imp", 0).exists());
    assert!(!daemon.block_file("volume", "imp", 1).exists());
    assert!(!daemon.block_file("volume", "imp", 4).exists());
    let out = dir.join("out.raw");
    daemon.cli(&["image", "export", "imp", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), data);

    if !tools_available(&["qemu-img"]) {
        return;
    }
    let qcow = dir.join("src.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(st.success());
    daemon.cli(&["image", "import", "q", qcow.to_str().unwrap()]);
    let back = dir.join("back.qcow2");
    daemon.cli(&[
        "image",
        "export",
        "q",
        back.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    let back_raw = dir.join("back.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&back)
        .arg(&back_raw)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read(&back_raw).unwrap(), data);
}

#[test]
fn sigterm_saves_and_removes_sockets() {
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "a", "--size", "8M"]);
    assert!(
        daemon.terminate(),
        "clean exit on SIGTERM:\n{}",
        daemon.log()
    );
    assert!(!daemon.socket("a").exists());
    assert!(!daemon.run_dir.join("control.sock").exists());
    // A second daemon on the same run dir is refused while one runs.
    daemon.restart();
    let second = std::process::Command::new(common::daemon::BIN)
        .arg("--run-dir")
        .arg(&daemon.run_dir)
        .arg("serve")
        .arg("--ram-dir")
        .arg(&daemon.ram_dir)
        .arg("--volume-dir")
        .arg(&daemon.volume_dir)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another cormorant daemon"));
    assert_eq!(daemon.cli(&["image", "list"])[0]["name"], "a");
}

#[test]
fn image_sockets_get_the_configured_group_and_mode() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = TestDir::new();
    let args = ["--socket-group", "0", "--socket-mode", "0660"].map(String::from);
    let daemon = Daemon::start_with(dir.path(), args.to_vec());
    daemon.cli(&["image", "create", "s", "--size", "1M"]);
    let meta = std::fs::metadata(daemon.socket("s")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0);
    let control = std::fs::metadata(daemon.run_dir.join("control.sock")).unwrap();
    assert_eq!(
        control.permissions().mode() & 0o777,
        0o600,
        "control stays private"
    );
}

/// `serve` with `args` in `dir`; it must fail at start. Returns its stderr.
fn serve_refused(dir: &std::path::Path, args: &[&std::ffi::OsStr]) -> String {
    let output = std::process::Command::new(common::daemon::BIN)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("serve")
        .arg("--volume-dir")
        .arg(dir.join("vol"))
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success(), "serve started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn serve_refuses_an_open_ram_dir_and_a_readable_cluster_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new();
    let ram = dir.path().join("ram");
    std::fs::create_dir(&ram).unwrap();
    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stderr = serve_refused(dir.path(), &["--ram-dir".as_ref(), ram.as_os_str()]);
    assert!(
        stderr.contains(&ram.display().to_string())
            && stderr.contains("0755")
            && stderr.contains("chmod 700"),
        "{stderr}"
    );

    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o700)).unwrap();
    let key = dir.path().join("cluster.key");
    std::fs::write(&key, "a5".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let args = [
        "--ram-dir".as_ref(),
        ram.as_os_str(),
        "--node".as_ref(),
        "a".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--cluster-key-file".as_ref(),
        key.as_os_str(),
        "--etcd".as_ref(),
        "http://127.0.0.1:1".as_ref(),
    ];
    let stderr = serve_refused(dir.path(), &args);
    assert!(
        stderr.contains(&key.display().to_string())
            && stderr.contains("0644")
            && stderr.contains("chmod 600"),
        "{stderr}"
    );
}
