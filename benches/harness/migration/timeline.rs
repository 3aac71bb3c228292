//! A Cormorant migration's switch-over as the two daemons logged it (debug level, millisecond
//! timestamps): where the time between the source stopping the device and the destination
//! serving again goes. Every step is given in ms after the source began stopping its queue.

use std::fmt;

/// The steps, in the order they happen: (which log, what the line contains, label).
const STEPS: [(Side, &str, &str); 7] = [
    (Side::Source, "stopping queue", "source stop"),
    (Side::Source, "drained", "drained"),
    (
        Side::Source,
        "device stopped; deactivating",
        "device_stopped",
    ),
    (Side::Source, "no longer active here", "deactivated (etcd)"),
    (Side::Destination, "kicked while not ready", "first kick"),
    (Side::Destination, "taken over from", "taken over (etcd)"),
    (Side::Destination, "serving after the take-over", "serving"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Each step's time in ms after the source's stop, where both logs had it.
pub struct Timeline {
    steps: Vec<(&'static str, Option<i64>)>,
    /// The destination waited for the source's active key (`take_over_when_free`).
    waited: Option<String>,
}

/// The timeline of image `image` from the source's and the destination's logs; None if the
/// source never logged a stop (a daemon not at debug level). The source may have stopped the
/// device before (the guest's driver resets it at boot): its steps are the last ones before
/// the destination's first kick. The destination logs each of its steps once.
pub fn of(image: &str, source_log: &str, destination_log: &str) -> Option<Timeline> {
    let tag = format!("image {image}: ");
    let times = |log: &str, needle: &str| -> Vec<i64> {
        log.lines()
            .filter(|l| l.contains(&tag) && l.contains(needle))
            .filter_map(ms_of_day)
            .collect()
    };
    let kick = times(destination_log, STEPS[4].1).first().copied();
    let at = |side: Side, needle: &str| match side {
        Side::Source => times(source_log, needle)
            .into_iter()
            .rfind(|t| kick.is_none_or(|k| *t <= k)),
        Side::Destination => times(destination_log, needle).first().copied(),
    };
    let t0 = at(Side::Source, STEPS[0].1)?;
    let steps = STEPS
        .iter()
        .map(|(side, needle, label)| (*label, at(*side, needle).map(|t| t - t0)))
        .collect();
    let waited = destination_log
        .lines()
        .find(|l| l.contains(&tag) && l.contains("waited"))
        .and_then(|l| l.split_once(&tag))
        .map(|(_, msg)| msg.to_string());
    Some(Timeline { steps, waited })
}

/// The time of day (ms) of an env_logger line `[2026-11-30T10:20:00.123Z DEBUG ...] ...`.
fn ms_of_day(line: &str) -> Option<i64> {
    let stamp = line.strip_prefix('[')?.split_whitespace().next()?;
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let (hms, ms) = time.split_once('.')?;
    let mut parts = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    Some(((h * 60 + m) * 60 + s) * 1000 + ms.get(..3)?.parse::<i64>().ok()?)
}

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(label, t)| match t {
                Some(t) => format!("{label} +{t}"),
                None => format!("{label} -"),
            })
            .collect();
        write!(
            f,
            "switch-over (ms after the source's stop): {}",
            steps.join(", ")
        )?;
        if let Some(w) = &self.waited {
            write!(f, "; destination {w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_read_from_both_logs() {
        let src = "[2026-11-30T10:19:50.000Z DEBUG cormorant::virtio::backend] image mig1: stopping queue 0 (draining)\n\
                   [2026-11-30T10:20:00.100Z DEBUG cormorant::virtio::backend] image mig1: stopping queue 0 (draining)\n\
                   [2026-11-30T10:20:00.104Z DEBUG cormorant::virtio::backend] image mig1: queue 0 drained\n\
                   [2026-11-30T10:20:00.105Z DEBUG cormorant::ownership] image mig1: device stopped; deactivating\n\
                   [2026-11-30T10:20:00.112Z INFO  cormorant::ownership] image mig1: device stopped; no longer active here\n";
        let dst = "[2026-11-30T10:20:00.050Z DEBUG x] image mig10: kicked while not ready: taking over\n\
                   [2026-11-30T10:20:01.000Z DEBUG x] image mig1: kicked while not ready: taking over\n\
                   [2026-11-30T10:20:01.020Z INFO  x] image mig1: taken over from a (epoch 9)\n";
        let src = format!("{src}[2026-11-30T10:20:05.000Z DEBUG y] image mig1: stopping queue 0\n");
        let src = src.as_str();
        let t = of("mig1", src, dst).expect("a timeline");
        let text = t.to_string();
        assert!(text.contains("drained +4"), "{text}");
        assert!(text.contains("deactivated (etcd) +12"), "{text}");
        assert!(text.contains("first kick +900"), "{text}");
        assert!(text.contains("taken over (etcd) +920"), "{text}");
        assert!(text.contains("serving -"), "{text}");
        assert!(of("mig2", src, dst).is_none());
    }
}
