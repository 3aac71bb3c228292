//! Cormorant under libvirt, with a real libvirtd (private to the test, see
//! tests/common/libvirt.rs) and the example XML of libvirt/:
//!
//! - the examples as they stand are valid domain and device XML for libvirt;
//! - `virsh migrate --live` moves a writing guest between two libvirtd, one per node, with its
//!   disk following (the Cormorant image is adopted by the destination node first);
//! - a domain made from libvirt/domain.xml boots from a Cormorant image and writes and reads
//!   it; the daemon is restarted (SIGTERM) under the idle guest (`<reconnect>`); a second image is
//!   hot-plugged from libvirt/disk-hotplug.xml, used, unplugged; `virsh shutdown` powers the
//!   guest off through ACPI; the host reads back what the guest wrote with `image export`;
//!   the same with 25 restarts under guest writes.
//!
//! Needs root (libvirtd runs in its own mount and PID namespaces) and Debian's libvirt-daemon,
//! libvirt-daemon-driver-qemu and libvirt-clients (scripts/setup.sh installs them).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::guest::{rounds_script, write_initrd_with, GuestImage, GuestOutput};
use common::libvirt::Libvirtd;
use common::{md5_prefix, read_lossy, tools_available, wait_until, TestDir};

const TOOLS: &[&str] = &[
    "libvirtd",
    "virsh",
    "qemu-system-x86_64",
    "unshare",
    "md5sum",
];

/// The guest's part. Every read goes around the page cache (`iflag=direct`), so it is served
/// by the daemon. Lines `READY-*` hand over to the host, which acts and then gives a sign the
/// guest can see (a disk appears or goes, the power button is pressed).
const GUEST_SCRIPT: &str = r#"set -e
# Waits up to 60 s for the shell condition $1, or fails the script.
wait_for() {
    i=0
    while ! eval "$1"; do
        i=$((i + 1))
        [ $i -le 600 ] || { echo "timed out waiting for: $1"; exit 1; }
        sleep 0.1
    done
}
md5() { md5sum | cut -d' ' -f1; }
# md5 of the first $2 64 KiB chunks of disk $1
disk_md5() { dd if=$1 bs=64k count=$2 iflag=direct 2>/dev/null | md5; }
pressed() { read -r n rest </sys/firmware/acpi/interrupts/ff_pwr_btn; [ "$n" -gt 0 ]; }

echo "RESULT vda_serial=$(cat /sys/block/vda/serial)"
dd if=/dev/urandom of=/tmp/a bs=64k count=16 2>/dev/null
dd if=/tmp/a of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null
[ "$(disk_md5 /dev/vda 16)" = "$(md5 </tmp/a)" ] || { echo "vda: read back differs"; exit 1; }
echo READY-RESTART

# The host restarts the daemon, then plugs in vdb once QEMU has reconnected. With
# cormorant_write_during_restart on the command line, write and verify 256 KiB chunks between
# 1 and 5 MiB meanwhile: I/O waits while the daemon is away, and none may fail.
grep -q cormorant_write_during_restart /proc/cmdline || wait_for '[ -e /sys/block/vdb ]'
n=0
while [ ! -e /sys/block/vdb ]; do
    n=$((n + 1))
    [ $n -le 2000 ] || { echo "timed out waiting for vdb"; exit 1; }
    seek=$((16 + n % 16 * 4))
    dd if=/dev/urandom of=/tmp/c bs=64k count=4 2>/dev/null
    dd if=/tmp/c of=/dev/vda bs=64k seek=$seek oflag=direct conv=fsync 2>/dev/null ||
        { echo "write $n failed"; exit 1; }
    [ "$(dd if=/dev/vda bs=64k skip=$seek count=4 iflag=direct 2>/dev/null | md5)" = "$(md5 </tmp/c)" ] ||
        { echo "read back $n differs"; exit 1; }
done
echo "RESULT restart_loop=$n"
[ "$(disk_md5 /dev/vda 16)" = "$(md5 </tmp/a)" ] || { echo "vda: changed across the restart"; exit 1; }
dd if=/dev/urandom of=/tmp/b bs=64k count=16 2>/dev/null
dd if=/tmp/b of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null
echo "RESULT vda_md5=$(disk_md5 /dev/vda 32)"
echo "RESULT vdb_serial=$(cat /sys/block/vdb/serial)"
dd if=/tmp/b of=/dev/vdb bs=64k oflag=direct conv=fsync 2>/dev/null
[ "$(disk_md5 /dev/vdb 16)" = "$(md5 </tmp/b)" ] || { echo "vdb: read back differs"; exit 1; }
echo "RESULT vdb_md5=$(disk_md5 /dev/vdb 16)"
echo READY-UNPLUG

wait_for '[ ! -e /sys/block/vdb ]'
echo "RESULT vdb_unplugged=yes"
# The ACPI button driver is a module in Debian's cloud kernel; without it the power button
# event is not even enabled, and `virsh shutdown` would press in vain.
insmod /lib/modules/button.ko
echo READY-SHUTDOWN
wait_for pressed
echo "RESULT power_button=pressed"
# /init powers off when this script ends.
"#;

/// Whether this test can run here; like `tools_available`, a missing piece skips the test with
/// a note, or fails it under CI.
fn libvirt_available() -> bool {
    if !tools_available(TOOLS) {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "the libvirt tests need root under CI"
        );
        eprintln!("note: skipping test, libvirtd in its own namespaces needs root");
        return false;
    }
    true
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("libvirt")
        .join(name)
}

fn read_example(name: &str) -> String {
    let path = example(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Replaces every `from` with its `to`; panics if one is missing, so that an edited example
/// fails here loudly rather than being tested halfway.
fn substitute(text: &str, edits: &[(&str, &str)]) -> String {
    let mut text = text.to_string();
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "the example no longer contains {from:?}: update tests/libvirt.rs"
        );
        text = text.replace(from, to);
    }
    text
}

/// libvirt/domain.xml made fit for this machine: TCG (no KVM here), a small guest booting the
/// test kernel and initrd directly, and the test daemon's sockets. Everything Cormorant asks of
/// a domain (memory backing, the vhostuser disk, ACPI) is the example's own.
fn test_domain(image: &GuestImage, initrd: &Path, run_dir: &str, cmdline: &str) -> String {
    let boot = format!(
        "<kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>console=ttyS0 panic=-1 quiet cormorant_disks=1 {cmdline}</cmdline>",
        image.kernel.display(),
        initrd.display()
    );
    substitute(
        &read_example("domain.xml"),
        &[
            ("<domain type='kvm'>", "<domain type='qemu'>"),
            (
                "<memory unit='GiB'>2</memory>",
                "<memory unit='MiB'>256</memory>",
            ),
            ("<vcpu>2</vcpu>", "<vcpu>1</vcpu>"),
            ("<boot dev='hd'/>", &boot),
            ("<cpu mode='host-passthrough'/>", "<cpu mode='maximum'/>"),
            // The guest reboots on a kernel panic (panic=-1): let that end the run.
            (
                "<on_reboot>restart</on_reboot>",
                "<on_reboot>destroy</on_reboot>",
            ),
            ("/run/cormorant/", run_dir),
        ],
    )
}

/// A kernel module of the guest's kernel, decompressed (busybox insmod reads plain .ko only).
fn guest_module(kver: &str, rel: &str) -> Vec<u8> {
    let base = Path::new("/lib/modules").join(kver).join(rel);
    for (ext, unpack) in [("", None), (".xz", Some("xz")), (".zst", Some("zstd"))] {
        let path = PathBuf::from(format!("{}{ext}", base.display()));
        if !path.exists() {
            continue;
        }
        let Some(tool) = unpack else {
            return std::fs::read(&path).expect("read module");
        };
        let out = Command::new(tool)
            .arg("-dc")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(out.status.success(), "{tool} -dc {} failed", path.display());
        return out.stdout;
    }
    panic!("no module {} (.ko, .ko.xz or .ko.zst)", base.display());
}

/// A domain of the test's libvirtd and its serial console log.
struct Vm<'a> {
    libvirt: &'a Libvirtd,
    name: &'a str,
    console: PathBuf,
}

impl Vm<'_> {
    fn output(&self) -> GuestOutput {
        GuestOutput::from_console(&self.console, self.libvirt.qemu_log(self.name))
    }

    /// Panics with the console and QEMU's log.
    fn fail(&self, what: &str) -> ! {
        let out = self.output();
        panic!(
            "{what}\n---- console ({}) ----\n{}\n---- libvirt's QEMU log ----\n{}\n\
             ---- vda's virtqueues as QEMU sees them ----\n{}",
            out.console_path.display(),
            out.console,
            out.qemu_stderr,
            self.queue_status()
        );
    }

    /// vda's first virtqueue as QEMU sees it, and the flags and index words of its avail and
    /// used rings in guest memory: avail ahead of used is a request the backend never
    /// completed; equal indexes with a guest still waiting, a completion it was not told about.
    fn queue_status(&self) -> String {
        let status =
            self.hmp("info virtio-queue-status /machine/peripheral/virtio-disk0/virtio-backend 0");
        let mut text = status.clone();
        for ring in ["avail:", "used:"] {
            let addr = status
                .lines()
                .find_map(|l| l.trim().strip_prefix(ring))
                .map(str::trim);
            if let Some(addr) = addr {
                text += &format!("{ring} {}", self.hmp(&format!("xp /2hx {addr}")));
            }
        }
        text
    }

    /// A human monitor command's output (or error).
    fn hmp(&self, cmd: &str) -> String {
        let out = self
            .libvirt
            .virsh(&["qemu-monitor-command", self.name, "--hmp", cmd]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits (2 minutes at most: CI machines are slow and busy) for the guest to print `needle`.
    fn wait_console(&self, needle: &str) {
        let mut ended = false;
        let found = wait_until(Duration::from_secs(120), || {
            let text = read_lossy(&self.console);
            ended = text.contains("CORMORANT-GUEST-EXIT");
            text.contains(needle) || ended
        });
        if !found || !read_lossy(&self.console).contains(needle) {
            self.fail(&format!("the guest did not print {needle}"));
        }
    }

    fn wait_state(&self, prefix: &str, timeout: Duration) {
        if !wait_until(timeout, || {
            self.libvirt.domstate(self.name).starts_with(prefix)
        }) {
            let state = self.libvirt.domstate(self.name);
            self.fail(&format!("domain {}: {state}, not {prefix}", self.name));
        }
    }
}

fn in_use(daemon: &Daemon, image: &str) -> bool {
    daemon.cli(&["image", "info", image])["in_use"] == true
}

#[test]
fn examples_are_valid_libvirt_xml() {
    if !libvirt_available() {
        return;
    }
    let dir = TestDir::new();
    let libvirt = Libvirtd::start(&dir.join("libvirt"));
    let domain = example("domain.xml");
    let hotplug = example("disk-hotplug.xml");
    // --validate: against libvirt's schema; define itself checks the rest (a vhostuser disk
    // without shared memory is refused here). Sockets need not exist to define.
    libvirt.virsh_ok(&["define", "--validate", domain.to_str().unwrap()]);
    libvirt.virsh_ok(&[
        "attach-device",
        "vm1",
        hotplug.to_str().unwrap(),
        "--config",
    ]);
    let xml = libvirt.virsh_ok(&["dumpxml", "--inactive", "vm1"]);
    for needle in [
        "/run/cormorant/vm1-root.sock",
        "/run/cormorant/vm1-data.sock",
        "<target dev='vdb' bus='virtio'/>",
        "<access mode='shared'/>",
    ] {
        assert!(xml.contains(needle), "no {needle} in:\n{xml}");
    }
    libvirt.virsh_ok(&["undefine", "vm1"]);
}

/// SIGTERM and start again, as `systemctl restart cormorant` does; waits until QEMU is back.
fn restart(daemon: &mut Daemon, vm: &Vm) {
    let restarted = Instant::now();
    assert!(daemon.terminate(), "daemon did not stop cleanly");
    daemon.start_again();
    if !wait_until(Duration::from_secs(20), || in_use(daemon, "vm1-root")) {
        vm.fail("QEMU did not reconnect to the restarted daemon");
    }
    eprintln!("daemon restarted, QEMU back in {:.1?}", restarted.elapsed());
}

#[test]
fn guest_on_cormorant_disks_under_libvirt() {
    if libvirt_available() {
        run_guest(0);
    }
}

/// The daemon restarted (SIGTERM, as `systemctl restart`) 25 times while the guest writes and
/// verifies. Two failures this has caught, each about once in a hundred restarts: a request
/// completed twice (QEMU, finding the connection closed, rewinds the avail ring to the used
/// index while the old daemon is still completing what it took; the restarted daemon now
/// resumes the ring from the in-flight region instead), and a guest waiting forever with its
/// rings even (the old daemon completed a request after QEMU had dropped its call eventfd; the
/// restarted daemon now signals every queue once). On a failure the message shows the avail
/// and used indexes.
#[test]
fn daemon_restarts_under_guest_writes() {
    if libvirt_available() {
        run_guest(25);
    }
}

/// Boots vm1 from vm1-root, restarts the daemon (once with the guest idle, or
/// `restarts_under_writes` times while it writes), hot-plugs vm1-data, unplugs it, shuts down.
fn run_guest(restarts_under_writes: u32) {
    let t0 = Instant::now();
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "vm1-root", "--size", "64M"]);
    daemon.cli(&["image", "create", "vm1-data", "--size", "64M"]);
    let run_dir = format!("{}/", daemon.run_dir.display());
    let libvirt = Libvirtd::start(&dir.join("libvirt"));
    eprintln!("libvirtd up after {:.1?}", t0.elapsed());

    let image = GuestImage::get();
    let initrd = dir.join("initrd.img");
    let button = guest_module(&image.kver, "kernel/drivers/acpi/button.ko");
    write_initrd_with(
        &initrd,
        image,
        GUEST_SCRIPT,
        &[("lib/modules/button.ko", 0o644, &button)],
    );
    let domain_xml = dir.join("vm1.xml");
    let cmdline = if restarts_under_writes > 0 {
        "cormorant_write_during_restart"
    } else {
        ""
    };
    std::fs::write(&domain_xml, test_domain(image, &initrd, &run_dir, cmdline)).unwrap();
    libvirt.virsh_ok(&["define", "--validate", domain_xml.to_str().unwrap()]);
    let vm = Vm {
        libvirt: &libvirt,
        name: "vm1",
        // The example's serial <log file=...>, under /var/log/libvirt in libvirtd's namespace.
        console: libvirt.log_path("qemu/vm1-serial.log"),
    };

    let booted = Instant::now();
    libvirt.virsh_ok(&["start", "vm1"]);
    vm.wait_console("READY-RESTART");
    eprintln!("guest booted and wrote vda in {:.1?}", booted.elapsed());

    // QEMU reconnects to the restarted daemon (<reconnect timeout='1'/>) and sets the device up
    // again; the guest's I/O waits meanwhile.
    if restarts_under_writes == 0 {
        restart(&mut daemon, &vm);
    }
    for i in 0..restarts_under_writes {
        // Writes before and after each restart, a varying time, so that restarts fall at
        // different points of the guest's write, flush and read.
        std::thread::sleep(Duration::from_millis(150 + (i as u64 * 137) % 500));
        restart(&mut daemon, &vm);
    }
    std::thread::sleep(Duration::from_millis(300));

    let hotplug = substitute(
        &read_example("disk-hotplug.xml"),
        &[("/run/cormorant/", &run_dir)],
    );
    let hotplug_xml = dir.join("vm1-data.xml");
    std::fs::write(&hotplug_xml, hotplug).unwrap();
    let hotplug_xml = hotplug_xml.to_str().unwrap();
    let plugged = Instant::now();
    libvirt.virsh_ok(&["attach-device", "vm1", hotplug_xml, "--live"]);
    vm.wait_console("READY-UNPLUG");
    assert!(in_use(&daemon, "vm1-data"));
    libvirt.virsh_ok(&["detach-device", "vm1", hotplug_xml, "--live"]);
    let unplugged = wait_until(Duration::from_secs(30), || {
        !libvirt
            .virsh_ok(&["domblklist", "vm1"])
            .contains("vm1-data.sock")
            && !in_use(&daemon, "vm1-data")
    });
    if !unplugged {
        vm.fail("vdb was not unplugged, or QEMU still holds vm1-data");
    }
    vm.wait_console("READY-SHUTDOWN");
    eprintln!(
        "vdb plugged, used and unplugged in {:.1?}",
        plugged.elapsed()
    );

    let shutdown = Instant::now();
    libvirt.virsh_ok(&["shutdown", "vm1"]);
    vm.wait_state("shut off", Duration::from_secs(60));
    assert_eq!(libvirt.domstate("vm1"), "shut off (shutdown)");
    eprintln!("ACPI shutdown in {:.1?}", shutdown.elapsed());

    let out = vm.output();
    out.expect_ok();
    assert_eq!(out.expect_value("vda_serial"), "vm1-root");
    assert_eq!(out.expect_value("vdb_serial"), "vm1-data");
    assert_eq!(out.expect_value("power_button"), "pressed");
    if restarts_under_writes > 0 {
        let loops: u32 = out.expect_value("restart_loop").parse().unwrap();
        assert!(loops > restarts_under_writes, "only {loops} writes");
        eprintln!("{loops} verified writes around the restarts");
    }

    // What the guest wrote is in the images, as the host reads them through the daemon.
    for (name, key, len) in [
        ("vm1-root", "vda_md5", 2 << 20),
        ("vm1-data", "vdb_md5", 1 << 20),
    ] {
        let file = dir.join(&format!("{name}.raw"));
        daemon.cli(&["image", "export", name, file.to_str().unwrap()]);
        assert_eq!(md5_prefix(&file, len), out.expect_value(key), "{name}");
    }
    eprintln!("whole test {:.1?}", t0.elapsed());
}

/// `virsh migrate --live` between two libvirtd, one per node, each in its own namespaces with
/// its own host UUID and its node's sockets at `/run/cormorant`, as on two machines: the
/// example domain as it stands (but for the test kernel), `cormorant image adopt` on the
/// destination node, and nothing else. The guest writes and verifies throughout; afterwards b
/// owns the image, a no longer exports it, and the blocks move to b.
#[test]
fn virsh_migrate_moves_the_guest_and_its_disk_follows() {
    if !libvirt_available() {
        return;
    }
    let t0 = Instant::now();
    if !tools_available(&["etcd"]) {
        return;
    }
    let dir = TestDir::new();
    let (_etcd, cluster) = common::etcd_cluster(dir.path(), 2);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("vm1-root", "16M", "1M", &["a:ram"]);
    let node = |name: &str, uuid: &str, daemon: &Daemon| {
        Libvirtd::start_node(
            &dir.join(&format!("libvirt-{name}")),
            Some(uuid),
            &[(daemon.run_dir.as_path(), "/run/cormorant")],
        )
    };
    let libvirt_a = node("a", "5a0d3c1e-7b2f-4c6a-9e81-00000000000a", a);
    let libvirt_b = node("b", "5a0d3c1e-7b2f-4c6a-9e81-00000000000b", b);

    let image = GuestImage::get();
    let initrd = dir.join("initrd.img");
    write_initrd_with(&initrd, image, &rounds_script(40), &[]);
    let domain_xml = dir.join("vm1.xml");
    let domain = test_domain(image, &initrd, "/run/cormorant/", "");
    std::fs::write(&domain_xml, domain).unwrap();
    libvirt_a.virsh_ok(&["define", "--validate", domain_xml.to_str().unwrap()]);
    libvirt_a.virsh_ok(&["start", "vm1"]);
    let on = |libvirt| Vm {
        libvirt,
        name: "vm1",
        console: libvirt.log_path("qemu/vm1-serial.log"),
    };
    let (vm_a, vm_b) = (on(&libvirt_a), on(&libvirt_b));
    vm_a.wait_console("ROUND 3");
    eprintln!("guest writing on a after {:.1?}", t0.elapsed());

    assert_eq!(b.cli(&["image", "adopt", "vm1-root"])["image"], "vm1-root");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let migrating = Instant::now();
    let out = libvirt_a.virsh(&[
        "migrate",
        "--live",
        "--persistent",
        "--undefinesource",
        "vm1",
        &libvirt_b.uri(),
        &format!("tcp://127.0.0.1:{port}"),
    ]);
    if !out.status.success() {
        vm_a.fail(&format!(
            "virsh migrate failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    eprintln!("migrated in {:.1?}", migrating.elapsed());
    assert!(
        !libvirt_a
            .virsh_ok(&["list", "--all", "--name"])
            .contains("vm1"),
        "vm1 is still defined on a"
    );

    vm_b.wait_console("CORMORANT-GUEST-EXIT");
    let out = vm_b.output();
    out.expect_ok();
    assert_eq!(out.value("done"), Some("yes"), "{}", out.console);
    assert_eq!(out.value("mismatch"), None, "{}", out.console);
    assert_eq!(out.value("write_error"), None, "{}", out.console);
    let before = vm_a.output().console;
    assert!(before.contains("ROUND 3"), "{before}");
    assert!(
        !before.contains("write_error") && !before.contains("mismatch"),
        "{before}"
    );

    // b took the image over when the guest started the disk there; a is fenced.
    assert!(!a.socket("vm1-root").exists(), "a still exports vm1-root");
    let localized = wait_until(Duration::from_secs(60), || {
        let info = b.cli(&["image", "info", "vm1-root"]);
        info["blocks"].as_array().unwrap().iter().all(|blk| {
            let l = blk["locations"].as_array().unwrap();
            l.len() == 1 && l[0]["node"] == "b" && l[0]["synced"] == true
        })
    });
    assert!(localized, "blocks did not move to b:\n{}", b.log());
    eprintln!("whole test {:.1?}", t0.elapsed());
}
