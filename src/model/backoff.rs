//! Retry delays: doubling from 100 ms (or another first step) up to a cap, each one drawn at
//! random from its upper half (backon's exponential backoff with jitter), so that replicas
//! failing together (a database failover, a broker restart) do not retry in lockstep.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

const FIRST: Duration = Duration::from_millis(100);

/// Delay that doubles from 100 ms up to a cap, reset after a success: backon's exponential
/// backoff with jitter, each delay drawn from `[step / 2, step)` ("equal jitter"), so a
/// retry never comes sooner than half the plain backoff nor later than the cap.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    cap: Duration,
}

impl Backoff {
    pub fn new(cap: Duration) -> Self {
        Self::between(FIRST, cap)
    }

    /// Doubling from `first` instead of 100 ms.
    pub fn between(first: Duration, cap: Duration) -> Self {
        // backon adds a jitter within [0, delay): half the steps, jittered, are the steps'
        // upper halves. Seeded per process, so that replicas do not draw the same delays.
        let builder = ExponentialBuilder::default()
            .with_min_delay(first / 2)
            .with_max_delay(cap / 2)
            .with_factor(2.0)
            .with_jitter()
            .with_jitter_seed(fastrand::u64(..))
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            cap,
        }
    }

    /// The next delay: between half of the doubling step and the step itself.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.cap).min(self.cap)
    }

    pub fn reset(&mut self) {
        self.builder = self.builder.with_jitter_seed(fastrand::u64(..));
        self.delays = self.builder.build();
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
