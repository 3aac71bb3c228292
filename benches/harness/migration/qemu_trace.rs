//! Where QEMU's downtime goes, from a few of the source QEMU's own trace events (the `log`
//! trace backend, one `pid@secs.usecs:event args` line each with `-msg timestamp=on`): the
//! downtime starts as the VM stops, which stops the vhost-user device (SET_VRING_ENABLE 0 and
//! GET_VRING_BASE per queue, each answered by the backend) - the backend's share; the rest is
//! QEMU sending the last dirty RAM and the device state.

use std::path::Path;

/// The events traced: cheap, a few hundred lines per guest.
const EVENTS: [&str; 5] = [
    "vhost_dev_stop",
    "vhost_user_read",
    "vhost_user_write",
    "migration_completion_vm_stop",
    "migrate_set_state",
];

/// QEMU arguments that trace [`EVENTS`] into `file`.
pub fn args(file: &Path) -> Vec<String> {
    // Every `-trace` names the file: one without `file=` would set it back to stderr.
    EVENTS
        .iter()
        .flat_map(|event| {
            [
                "-trace".to_string(),
                format!("enable={event},file={}", file.display()),
            ]
        })
        .chain(["-msg".to_string(), "timestamp=on".to_string()])
        .collect()
}

/// The steps of the switch-over on the source, in ms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Steps {
    /// From stopping the vhost-user device to the VM being stopped: the backend's share.
    pub device_stop_ms: f64,
    /// vhost-user messages sent meanwhile.
    pub messages: usize,
    /// From the VM being stopped to the migration completed: QEMU's final transfer.
    pub final_transfer_ms: f64,
}

/// The steps of the (first) migration in a source QEMU's trace.
pub fn parse(trace: &str) -> Option<Steps> {
    let events: Vec<(f64, &str)> = trace.lines().filter_map(event).collect();
    let stopped = events
        .iter()
        .position(|(_, e)| e.starts_with("migration_completion_vm_stop"))?;
    let device = events[..stopped]
        .iter()
        .rposition(|(_, e)| e.starts_with("vhost_dev_stop"))?;
    let completed = events[stopped..]
        .iter()
        .find(|(_, e)| e.starts_with("migrate_set_state new state completed"))?;
    let messages = events[device..stopped]
        .iter()
        .filter(|(_, e)| e.starts_with("vhost_user_write"))
        .count();
    Some(Steps {
        device_stop_ms: (events[stopped].0 - events[device].0) * 1e3,
        messages,
        final_transfer_ms: (completed.0 - events[stopped].0) * 1e3,
    })
}

/// `(seconds, "event args")` of a line `pid@secs.usecs:event args`.
fn event(line: &str) -> Option<(f64, &str)> {
    let (_, rest) = line.split_once('@')?;
    let (stamp, what) = rest.split_once(':')?;
    Some((stamp.parse().ok()?, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_device_stop_and_final_transfer() {
        let trace = "\
7@10.000000:vhost_dev_stop 0x1:virtio-blk vrings:1
7@10.000500:vhost_user_write req:11 flags:0x1
7@10.001000:migrate_set_state new state active
7@12.198545:vhost_dev_stop 0x1:virtio-blk vrings:1
7@12.199122:vhost_user_write req:18 flags:0x9
7@12.199719:vhost_user_read req:18 flags:0x5
7@12.199959:vhost_user_write req:11 flags:0x1
7@12.200869:vhost_user_read req:11 flags:0x5
7@12.201595:migration_completion_vm_stop ret 0
7@12.201600:migrate_set_state new state device
7@12.219774:migrate_set_state new state completed
";
        let s = parse(trace).expect("steps");
        assert!((s.device_stop_ms - 3.05).abs() < 0.01, "{s:?}");
        assert!((s.final_transfer_ms - 18.179).abs() < 0.01, "{s:?}");
        assert_eq!(s.messages, 2);
        assert_eq!(parse("7@1.0:vhost_dev_stop x\n"), None);
    }
}
