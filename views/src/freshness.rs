//! How fresh each view is on each replica, and whether a read of some views fits a replica.
//!
//! A probe per replica reads, every monitor interval, the newest successful refresh of each view that the
//! replica has replayed (the history row commits with the refresh, see `refresh`), as an age in the server's
//! clock. The age is turned into an `Instant` on this gateway's clock at once (`probe time - age`), so the
//! staleness at any later moment is `now - that instant`. This assumes the primary's and the replica's clocks
//! agree (NTP); the replica's `now()` and the primary's `now()` stamp are compared.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// A snapshot: `refreshed[replica][view]`, the instant (on this gateway's clock) as of which the replica's copy
/// of the view is current, or `None` when it has replayed no refresh of it (or was not read yet).
#[derive(Clone, Debug, Default)]
pub struct Freshness {
    pub refreshed: Vec<Vec<Option<Instant>>>,
}

/// Whether every view in `views` (a set of view indexes) is fresh enough on `replica` at `now`.
pub fn fits(
    freshness: &Freshness,
    max_staleness: &[Duration],
    views: u64,
    replica: usize,
    now: Instant,
) -> bool {
    let Some(per_view) = freshness.refreshed.get(replica) else {
        return false;
    };
    (0..max_staleness.len().min(64))
        .filter(|i| views & (1u64 << i) != 0)
        .all(|i| match per_view.get(i).copied().flatten() {
            Some(at) => now.saturating_duration_since(at) <= max_staleness[i],
            None => false,
        })
}

/// What the freshness probe reads on a replica: per configured view, seconds since its newest replayed
/// successful refresh began.
pub(crate) const PROBE_SQL: &str = "SELECT v.name, \
     extract(epoch FROM now() - (SELECT max(r.started_at) FROM regiongate.view_refreshes r \
                                 WHERE r.view_name = v.name AND r.error IS NULL))::float8 \
     FROM unnest($1::text[]) AS v(name)";

/// Converts a probe's ages into instants on this gateway's clock.
pub(crate) fn instants(probed_at: Instant, ages: &[Option<f64>]) -> Vec<Option<Instant>> {
    ages.iter()
        .map(|age| {
            age.and_then(|a| Duration::try_from_secs_f64(a.max(0.0)).ok())
                .and_then(|a| probed_at.checked_sub(a))
        })
        .collect()
}

/// Shared, swapped whole by the probes.
pub(crate) type Shared = arc_swap::ArcSwap<Freshness>;

pub(crate) fn publish(shared: &Shared, replica: usize, views: Vec<Option<Instant>>) {
    // Probes are few and infrequent: copy, change, store (readers never lock).
    shared.rcu(|old| {
        let mut new = Freshness::clone(old);
        if new.refreshed.len() <= replica {
            new.refreshed.resize(replica + 1, Vec::new());
        }
        new.refreshed[replica] = views.clone();
        Arc::new(new)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_fits_only_where_every_view_it_reads_is_fresh_enough() {
        let now = Instant::now();
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        let freshness = Freshness {
            // replica 0: view 0 refreshed 10s ago, view 1 100s ago; replica 1: view 0 never.
            refreshed: vec![vec![ago(10), ago(100)], vec![None, ago(1)]],
        };
        let max = [Duration::from_secs(30), Duration::from_secs(300)];
        assert!(fits(&freshness, &max, 0b01, 0, now));
        assert!(fits(&freshness, &max, 0b11, 0, now));
        assert!(
            !fits(&freshness, &max, 0b01, 1, now),
            "never refreshed there"
        );
        assert!(fits(&freshness, &max, 0b10, 1, now));
        assert!(
            !fits(&freshness, &max, 0b01, 0, now + Duration::from_secs(21)),
            "over 30s by then"
        );
        assert!(!fits(&freshness, &max, 0b01, 7, now), "unknown replica");
    }

    #[test]
    fn ages_become_instants_on_the_gateways_clock() {
        let probed = Instant::now();
        let got = instants(probed, &[Some(2.5), None, Some(-0.1)]);
        assert_eq!(got[0], Some(probed - Duration::from_millis(2500)));
        assert_eq!(got[1], None);
        // Clock skew can make an age negative: that is "just now", never the future.
        assert_eq!(got[2], Some(probed));
    }
}
