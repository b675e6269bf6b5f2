//! Retry delays: doubling from 100 ms (or another first step) up to a cap, each one drawn at random from its upper
//! half, so that replicas failing together (a database failover, a broker restart) do not
//! retry in lockstep.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(100);

/// Delay that doubles from 100 ms up to a cap, reset after a success.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(cap: Duration) -> Self {
        Self::between(FIRST, cap)
    }

    /// Doubling from `first` instead of 100 ms.
    pub fn between(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            next: first,
            cap,
        }
    }

    /// The next delay: between half of the doubling step and the step itself ("equal
    /// jitter"), so a retry never comes sooner than half the plain backoff.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next.min(self.cap);
        self.next = (self.next * 2).min(self.cap);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_in_the_upper_half() {
        let cap = Duration::from_secs(2);
        let mut backoff = Backoff::new(cap);
        let mut step = FIRST;
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(cap);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= FIRST);
    }

    #[test]
    fn two_replicas_do_not_retry_in_lockstep() {
        let (mut a, mut b) = (
            Backoff::new(Duration::from_secs(30)),
            Backoff::new(Duration::from_secs(30)),
        );
        let delays: Vec<(Duration, Duration)> =
            (0..8).map(|_| (a.next_delay(), b.next_delay())).collect();
        assert!(delays.iter().any(|(x, y)| x != y), "{delays:?}");
    }
}
