//! Rate limits for logs on the data path: a guest, a failing disk or a dead peer can produce
//! an error per request, hundreds of thousands a second, and a log line each would bury the
//! daemon's log (and its disk). Each source keeps its own [`Throttle`], without locks.

/// Lines logged in full before only every power of two is.
const LOGGED_IN_FULL: u64 = 8;

/// Counts events and says which ones to log: the first few, then the 16th, 32nd, 64th... so
/// the log shows both that it started and that it goes on, with the count.
#[derive(Debug, Default)]
pub struct Throttle {
    seen: u64,
}

impl Throttle {
    /// Counts one event; returns the count so far when this one should be logged.
    pub fn allow(&mut self) -> Option<u64> {
        self.seen += 1;
        let n = self.seen;
        (n <= LOGGED_IN_FULL || n.is_power_of_two()).then_some(n)
    }
}

/// A [`Throttle`] several threads share (one peer connection's workers): the count is an
/// atomic, the rule the same.
#[derive(Debug, Default)]
pub struct SharedThrottle {
    seen: std::sync::atomic::AtomicU64,
}

impl SharedThrottle {
    /// Counts one event; returns the count so far when this one should be logged.
    pub fn allow(&self) -> Option<u64> {
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        (n <= LOGGED_IN_FULL || n.is_power_of_two()).then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_few_then_powers_of_two() {
        let mut t = Throttle::default();
        let logged: Vec<u64> = (0..100).filter_map(|_| t.allow()).collect();
        assert_eq!(logged, [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]);
        let shared = SharedThrottle::default();
        let logged: Vec<u64> = (0..100).filter_map(|_| shared.allow()).collect();
        assert_eq!(logged, [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]);
    }
}
