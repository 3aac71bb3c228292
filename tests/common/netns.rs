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
