//! A network namespace joined to this one by a veth pair, for tests that cut or slow the
//! link between two nodes. The addresses are from 198.51.100.0/24 (TEST-NET-2, not routed;
//! TEST-NET-1 is this machine's own network), on the test's own veth pair only.

use std::process::Command;

pub struct Netns {
    pub name: String,
    host_if: String,
}

fn run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn ip(args: &[&str]) -> bool {
    run("ip", args)
}

impl Netns {
    /// 198.51.100.1 here, 198.51.100.2 in the namespace; `None` where namespaces cannot be
    /// made (not root).
    pub fn create(tag: &str) -> Option<Netns> {
        let name = format!("cormorant-{tag}-{}", std::process::id());
        let host_if = format!("cmh{}", std::process::id() % 100_000);
        let peer_if = format!("cmp{}", std::process::id() % 100_000);
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
        };
        let ok = ip(&["netns", "add", &name])
            && ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
            ])
            && ip(&["link", "set", &peer_if, "netns", &name])
            && ip(&["addr", "add", "198.51.100.1/30", "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "-n",
                &name,
                "addr",
                "add",
                "198.51.100.2/30",
                "dev",
                &peer_if,
            ])
            && ip(&["-n", &name, "link", "set", &peer_if, "up"])
            && ip(&["-n", &name, "link", "set", "lo", "up"]);
        ok.then_some(ns)
    }

    /// Takes the link down (`true`) or up again.
    pub fn cut(&self, down: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.host_if,
            if down { "down" } else { "up" }
        ]));
    }

    /// Limits what this side sends into the namespace to `rate` (tc syntax, e.g. `48mbit`),
    /// with at most `latency` (e.g. `300ms`) of it queued: a slow link, one FIFO for every
    /// connection on it.
    pub fn limit_rate(&self, rate: &str, latency: &str) {
        assert!(
            run(
                "tc",
                &[
                    "qdisc",
                    "add",
                    "dev",
                    &self.host_if,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "64kb",
                    "latency",
                    latency,
                ],
            ),
            "tc qdisc add tbf failed"
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A namespace for `tag`, or `None` (with a note) where namespaces cannot be made; in CI
/// they must be.
pub fn create_or_skip(tag: &str) -> Option<Netns> {
    let ns = Netns::create(tag);
    if ns.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "network namespaces are needed in CI"
        );
        eprintln!("note: cannot create network namespaces here; skipping");
    }
    ns
}

/// Two etcd-backed nodes across `ns`'s link: a here (198.51.100.1), b inside the namespace
/// (198.51.100.2), b reaching etcd through the veth too (by a proxy on a's side), so a cut
/// or a slow link takes etcd from it as well. Each node's lease lasts `lease_ttl` seconds.
/// Keep all three; they drop cluster first.
pub fn cluster_across(
    ns: &Netns,
    dir: &std::path::Path,
    lease_ttl: u64,
) -> (
    super::etcd::EtcdCluster,
    super::proxy::Proxy,
    super::daemon::Cluster,
) {
    let ips = ["198.51.100.1".to_string(), "198.51.100.2".to_string()];
    let etcd = super::start_etcd(dir);
    let first: std::net::SocketAddr = etcd.endpoints()[0]
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = super::proxy::Proxy::start_on("198.51.100.1", first);
    let endpoints = [etcd.endpoint_arg(), proxy.url()];
    let cluster = super::daemon::Cluster::start_etcd_at(
        dir,
        &ips,
        &[None, Some(ns.name.clone())],
        &endpoints,
        lease_ttl,
        None,
    );
    (etcd, proxy, cluster)
}
