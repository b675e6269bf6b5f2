//! Shard leases: which shards this replica may publish, under which epoch, and until when.
//! A replica trusts a lease only until the time *before* its last successful renewal plus
//! the TTL minus a safety margin, so it stops producing for a shard before the database
//! can hand the shard to another replica; marks are fenced by the epoch in the database.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::model::Backoff;
use crate::store::{Store, StoreError};
use crate::telemetry::{Health, LeaseRenewalFailed, LeasesRenewed, Rebalanced, ShardsOwned, emit};

/// Shards are fixed by the migration: `hashtextextended(aggregate_id, 0) & 255`.
pub(crate) const SHARD_COUNT: i16 = 256;

/// A lease this replica holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub epoch: i64,
    /// After this instant the replica must not produce for the shard.
    pub valid_until: Instant,
}

/// The shards this replica holds, shared between the lease keeper and the relay.
#[derive(Debug, Default)]
pub(crate) struct Ownership {
    state: Mutex<OwnershipState>,
}

#[derive(Debug, Default)]
struct OwnershipState {
    leases: BTreeMap<i16, Lease>,
    /// Held shards another replica should have; the relay releases them between batches.
    to_release: BTreeSet<i16>,
}

/// The leases usable for one batch.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub leases: BTreeMap<i16, Lease>,
}

impl Snapshot {
    /// `None` when every shard is held: the read needs no shard filter.
    pub(crate) fn shard_filter(&self) -> Option<Vec<i16>> {
        if self.leases.len() == SHARD_COUNT as usize {
            None
        } else {
            Some(self.leases.keys().copied().collect())
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// The epoch to fence a mark with, if the shard may still be produced to.
    pub(crate) fn producible(&self, shard: i16, now: Instant) -> Option<i64> {
        self.leases
            .get(&shard)
            .filter(|lease| lease.valid_until > now)
            .map(|lease| lease.epoch)
    }
}

impl Ownership {
    /// The state is plain data that every holder leaves consistent, so a poisoned lock
    /// (a holder panicked) is still safe to use and the relay never panics over it.
    fn lock(&self) -> std::sync::MutexGuard<'_, OwnershipState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Leases valid now and not being released.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let now = Instant::now();
        Snapshot {
            leases: state
                .leases
                .iter()
                .filter(|(shard, lease)| {
                    lease.valid_until > now && !state.to_release.contains(shard)
                })
                .map(|(shard, lease)| (*shard, *lease))
                .collect(),
        }
    }

    pub(crate) fn owned_count(&self) -> usize {
        let now = Instant::now();
        let state = self.lock();
        state
            .leases
            .values()
            .filter(|l| l.valid_until > now)
            .count()
    }

    /// Shards to give up, taken by the relay when nothing of theirs is in flight.
    pub(crate) fn take_releases(&self) -> Vec<(i16, i64)> {
        let mut state = self.lock();
        let shards: Vec<i16> = std::mem::take(&mut state.to_release).into_iter().collect();
        shards
            .into_iter()
            .filter_map(|shard| state.leases.remove(&shard).map(|l| (shard, l.epoch)))
            .collect()
    }

    /// Every held shard, for the final release on shutdown.
    pub(crate) fn take_all(&self) -> Vec<(i16, i64)> {
        let mut state = self.lock();
        state.to_release.clear();
        std::mem::take(&mut state.leases)
            .into_iter()
            .map(|(shard, lease)| (shard, lease.epoch))
            .collect()
    }

    fn held(&self) -> Vec<(i16, i64)> {
        let state = self.lock();
        state
            .leases
            .iter()
            .map(|(shard, lease)| (*shard, lease.epoch))
            .collect()
    }

    fn apply_renewal(
        &self,
        renewed: &[(i16, i64)],
        attempted: &[(i16, i64)],
        valid_until: Instant,
    ) {
        let mut state = self.lock();
        let mut lost = Vec::new();
        for (shard, epoch) in attempted {
            if !renewed.contains(&(*shard, *epoch)) {
                if state.leases.remove(shard).is_some() {
                    lost.push(*shard);
                }
                state.to_release.remove(shard);
            }
        }
        if !lost.is_empty() {
            warn!(
                shards = lost.len(),
                first = lost[0],
                "leases lost: another replica holds these shards now"
            );
        }
        // Only refresh leases still held under the same epoch: a shard the relay released
        // while this renewal was on its way must not come back.
        for (shard, epoch) in renewed {
            if let Some(lease) = state.leases.get_mut(shard) {
                if lease.epoch == *epoch {
                    lease.valid_until = valid_until;
                }
            }
        }
    }

    /// Puts back shards whose release failed; they stay marked for release.
    pub(crate) fn restore_releases(&self, releases: &[(i16, i64)], valid_until: Instant) {
        let mut state = self.lock();
        for (shard, epoch) in releases {
            state.leases.insert(
                *shard,
                Lease {
                    epoch: *epoch,
                    valid_until,
                },
            );
            state.to_release.insert(*shard);
        }
    }

    /// Drops shards the database says this replica no longer holds (a fenced mark).
    pub(crate) fn forget(&self, shards: &BTreeSet<i16>) {
        let mut state = self.lock();
        for shard in shards {
            state.leases.remove(shard);
            state.to_release.remove(shard);
        }
    }

    fn add(&self, acquired: &[(i16, i64)], valid_until: Instant) {
        let mut state = self.lock();
        for (shard, epoch) in acquired {
            state.leases.insert(
                *shard,
                Lease {
                    epoch: *epoch,
                    valid_until,
                },
            );
        }
    }

    fn request_release(&self, shards: &BTreeSet<i16>) {
        let mut state = self.lock();
        for shard in shards {
            if state.leases.contains_key(shard) {
                state.to_release.insert(*shard);
            }
        }
    }
}

/// The shards replica `me` should hold when `live` (sorted) are the live replicas: shard
/// `s` goes to `live[s % live.len()]`, an exactly balanced share.
pub(crate) fn desired_shards(me: &str, live: &[String]) -> BTreeSet<i16> {
    let Some(rank) = live.iter().position(|r| r == me) else {
        return BTreeSet::new();
    };
    (0..SHARD_COUNT)
        .filter(|s| *s as usize % live.len() == rank)
        .collect()
}

/// Lease timing.
#[derive(Debug, Clone)]
pub(crate) struct LeaseTiming {
    pub ttl: Duration,
    pub renew_interval: Duration,
    /// Subtracted from the TTL: clock drift and the time a renewal takes to return.
    pub margin: Duration,
}

/// Heartbeats, renews held leases, acquires this replica's share, asks the relay to
/// release the rest. Runs until `cancel`.
pub(crate) struct LeaseKeeper {
    pub store: Store,
    pub replica_id: String,
    pub timing: LeaseTiming,
    pub ownership: Arc<Ownership>,
    pub health: Arc<Health>,
    /// Woken when a held shard should be released, so an idle relay does it at once.
    pub wake_relay: Arc<Notify>,
    /// Whether the heartbeat records the replica's state (the schema and grants allowed it
    /// at start; a heartbeat that finds them gone stops trying).
    pub reports_state: AtomicBool,
}

impl LeaseKeeper {
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.timing.renew_interval);
        let mut last_desired: Option<BTreeSet<i16>> = None;
        while !cancel.is_cancelled() {
            let next = match self.round(&mut last_desired).await {
                Ok(next) => {
                    backoff.reset();
                    self.health.set_leases_ok(true);
                    next
                }
                Err(err) => {
                    // Counted before readiness drops, as the relay's own database errors are.
                    emit(LeaseRenewalFailed {
                        kind: err.kind(),
                        error: &err,
                    });
                    self.health.set_leases_ok(false);
                    backoff.next_delay()
                }
            };
            emit(ShardsOwned {
                shards: self.ownership.owned_count(),
            });
            tokio::select! {
                _ = sleep(next) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }

    /// One heartbeat. Returns how long to wait before the next.
    async fn round(
        &self,
        last_desired: &mut Option<BTreeSet<i16>>,
    ) -> Result<Duration, StoreError> {
        let started = Instant::now();
        let valid_until = started + self.timing.ttl.saturating_sub(self.timing.margin);
        let (state, reason) = self.health.reported_state();
        let report = self
            .reports_state
            .load(Ordering::Relaxed)
            .then_some((state.as_str(), reason.as_deref()));
        let live = match self
            .store
            .heartbeat(&self.replica_id, self.timing.ttl, report)
            .await
        {
            // The state is optional; the heartbeat, which keeps the leases, is not.
            Err(err) if report.is_some() && err.is_missing_column_or_grant() => {
                warn!(error = %err, "the heartbeat can no longer record this replica's state for `outbox-relay status` (a grant or a column of outbox_replica went away); it goes on without: run `outbox-relay migrate` and deploy/sql/least-privilege.sql again");
                self.reports_state.store(false, Ordering::Relaxed);
                self.store
                    .heartbeat(&self.replica_id, self.timing.ttl, None)
                    .await?
            }
            other => other?,
        };
        let desired = desired_shards(&self.replica_id, &live);
        if last_desired.as_ref() != Some(&desired) {
            emit(Rebalanced {
                replicas: live.len(),
                shards: desired.len(),
            });
            *last_desired = Some(desired.clone());
        }

        let held = self.ownership.held();
        let renewed = self
            .store
            .renew_leases(&self.replica_id, &held, self.timing.ttl)
            .await?;
        emit(LeasesRenewed {
            leases: renewed.len(),
        });
        self.ownership.apply_renewal(&renewed, &held, valid_until);

        let held: BTreeSet<i16> = renewed.iter().map(|(shard, _)| *shard).collect();
        let surplus: BTreeSet<i16> = held.difference(&desired).copied().collect();
        if !surplus.is_empty() {
            self.ownership.request_release(&surplus);
            self.wake_relay.notify_one();
        }
        let wanted: Vec<i16> = desired.difference(&held).copied().collect();
        let mut next = self.timing.renew_interval;
        if !wanted.is_empty() {
            let acquired = self
                .store
                .acquire_leases(&self.replica_id, &wanted, self.timing.ttl)
                .await?;
            if !acquired.is_empty() {
                info!(shards = acquired.len(), "leases acquired");
                self.ownership.add(&acquired, valid_until);
                self.wake_relay.notify_one();
            }
            if acquired.len() < wanted.len() {
                // Come back when the first of the others' leases runs out.
                if let Some(wait) = self.store.next_lease_expiry(&wanted).await? {
                    next = next.min(wait + Duration::from_millis(50));
                }
            }
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_shares_are_balanced_and_disjoint() {
        let live: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let shares: Vec<BTreeSet<i16>> = live.iter().map(|r| desired_shards(r, &live)).collect();
        let total: usize = shares.iter().map(BTreeSet::len).sum();
        assert_eq!(total, SHARD_COUNT as usize);
        for share in &shares {
            assert!((85..=86).contains(&share.len()), "{}", share.len());
        }
        assert!(shares[0].is_disjoint(&shares[1]) && shares[1].is_disjoint(&shares[2]));
        assert!(desired_shards("z", &live).is_empty());
        assert_eq!(desired_shards("a", &live[..1]).len(), SHARD_COUNT as usize);
    }

    #[test]
    fn a_renewal_never_brings_back_a_released_shard() {
        let ownership = Ownership::default();
        let now = Instant::now();
        ownership.add(&[(1, 5), (2, 7)], now + Duration::from_secs(5));
        let attempted = ownership.held();
        ownership.request_release(&BTreeSet::from([2]));
        assert_eq!(ownership.take_releases(), vec![(2, 7)]);
        // The renewal was sent before the release and still renewed shard 2.
        ownership.apply_renewal(&attempted, &attempted, now + Duration::from_secs(9));
        let snap = ownership.snapshot();
        assert_eq!(snap.leases.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(snap.leases[&1].valid_until, now + Duration::from_secs(9));
    }

    #[test]
    fn snapshot_filters_expired_and_released_leases() {
        let ownership = Ownership::default();
        let now = Instant::now();
        ownership.add(&[(1, 5), (2, 7)], now + Duration::from_secs(5));
        ownership.add(&[(3, 1)], now - Duration::from_millis(1));
        let snap = ownership.snapshot();
        assert_eq!(snap.leases.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(snap.producible(2, now), Some(7));
        assert_eq!(snap.producible(3, now), None);
        ownership.request_release(&BTreeSet::from([2]));
        assert_eq!(ownership.snapshot().leases.len(), 1);
        assert_eq!(ownership.take_releases(), vec![(2, 7)]);
    }
}
