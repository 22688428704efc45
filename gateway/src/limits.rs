//! Admission limits that protect the gateway and the servers behind it from a flood: the rate of new
//! connections (over all clients and per client address) and failed logins per user and address.
//!
//! Each is checked before any expensive work: a connection over the rate is refused before its startup
//! packet is read. Failed logins are counted per (address, user), so that one bad client behind a NAT or a
//! load balancer locks out no one else; past `limits.max_failed_logins`, that user from that address may try
//! once per `failed_login_window / max_failed_logins` (the rate that locked it), and every other attempt is
//! refused before any SCRAM exchange. The right password gets in on an attempt that is let through.

use crate::config::Limits;
use crate::metrics::METRICS;
use crate::protocol::PgError;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Per-address tables are swept of stale entries when they grow past this.
const SWEEP_AT: usize = 10_000;
/// Failed-login entries kept at most (about 100 bytes each).
const MAX_FAILURE_ENTRIES: usize = 100_000;

/// A token bucket: `rate` tokens a second, holding at most one second's worth.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(rate: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate),
            last: now,
        }
    }

    fn take(&mut self, rate: u32, now: Instant) -> bool {
        let rate = f64::from(rate);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Failed logins of one user from one address.
#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    /// While locked: the earliest time the next attempt is let through.
    next_try: Instant,
}

/// Whose failed logins: the client's address and the user it logs in as.
type LoginKey = (IpAddr, Box<str>);

#[derive(Default)]
pub struct Admission {
    global: Mutex<Option<Bucket>>,
    per_client: Mutex<HashMap<IpAddr, Bucket>>,
    failures: Mutex<HashMap<LoginKey, Failures>>,
    /// Connections accepted and not yet through their login (`limits.max_pending_logins`).
    pending_logins: AtomicUsize,
}

/// One connection counted in [`Admission`]'s pending logins, until it is dropped.
pub struct PendingLogin<'a>(&'a Admission);

impl Drop for PendingLogin<'_> {
    fn drop(&mut self) {
        self.0.pending_logins.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Counts a connection that starts its login, unless `limits.max_pending_logins` are in progress: bare
    /// sockets that never log in hold no client slot, only one of these, for `limits.login_timeout` at most.
    pub fn begin_login(&self, limits: &Limits) -> Result<(), PgError> {
        let before = self.pending_logins.fetch_add(1, Ordering::AcqRel);
        if before >= limits.max_pending_logins {
            self.pending_logins.fetch_sub(1, Ordering::AcqRel);
            return Err(refusal(format!(
                "regiongate: too many connections still logging in (limits.max_pending_logins is {}); retry shortly",
                limits.max_pending_logins
            )));
        }
        Ok(())
    }

    /// The guard of a login [`Admission::begin_login`] counted: dropping it ends the count.
    pub fn pending_login(&self) -> PendingLogin<'_> {
        PendingLogin(self)
    }

    pub fn pending_logins(&self) -> usize {
        self.pending_logins.load(Ordering::Acquire)
    }

    /// Whether a new connection from `ip` may go on, by the connection rates.
    pub fn admit(&self, ip: IpAddr, limits: &Limits) -> Result<(), PgError> {
        let now = Instant::now();
        if limits.connection_rate > 0 {
            let mut global = self.global.lock().unwrap_or_else(|p| p.into_inner());
            let bucket = global.get_or_insert_with(|| Bucket::full(limits.connection_rate, now));
            if !bucket.take(limits.connection_rate, now) {
                return Err(refusal(format!(
                    "regiongate: too many new connections (limits.connection_rate is {}/s); retry shortly",
                    limits.connection_rate
                )));
            }
        }
        if limits.client_connection_rate > 0 {
            let rate = limits.client_connection_rate;
            let mut buckets = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
            if buckets.len() >= SWEEP_AT {
                // A bucket idle for a second is full again: forgetting it changes nothing.
                buckets
                    .retain(|_, b| now.saturating_duration_since(b.last) < Duration::from_secs(1));
            }
            let bucket = buckets.entry(ip).or_insert_with(|| Bucket::full(rate, now));
            if !bucket.take(rate, now) {
                return Err(refusal(format!(
                    "regiongate: too many new connections from {ip} (limits.client_connection_rate is \
                     {rate}/s); retry shortly"
                )));
            }
        }
        Ok(())
    }

    /// Whether `user` may try to log in from `ip`, by its recent failures: yes, unless it is locked out and
    /// its last attempt let through was too recent.
    pub fn login_allowed(&self, ip: IpAddr, user: &str, limits: &Limits) -> Result<(), PgError> {
        if limits.max_failed_logins == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let Some(f) = failures.get_mut(&(ip, user.into())) else {
            return Ok(());
        };
        let locked = f.count >= limits.max_failed_logins
            && now.saturating_duration_since(f.last) < limits.failed_login_window;
        if !locked {
            return Ok(());
        }
        if now >= f.next_try {
            f.next_try = now + locked_retry_interval(limits);
            return Ok(());
        }
        let wait = f.next_try.saturating_duration_since(now);
        METRICS.clients_refused.with_label_values(&["28000"]).inc();
        Err(PgError::fatal(
            "28000",
            format!(
                "regiongate: too many failed logins for user \"{user}\" from {ip}; try again in {}s",
                wait.as_secs() + 1
            ),
        ))
    }

    /// A login of `user` from `ip` failed (wrong password or unknown user).
    pub fn login_failed(&self, ip: IpAddr, user: &str, limits: &Limits) {
        if limits.max_failed_logins == 0 {
            return;
        }
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= SWEEP_AT {
            failures
                .retain(|_, f| now.saturating_duration_since(f.last) < limits.failed_login_window);
            // Still full within one window (user names sprayed from many addresses): bounded memory first.
            while failures.len() >= MAX_FAILURE_ENTRIES {
                let Some(key) = failures.keys().next().cloned() else {
                    break;
                };
                failures.remove(&key);
            }
        }
        let entry = failures.entry((ip, user.into())).or_insert(Failures {
            count: 0,
            last: now,
            next_try: now,
        });
        if now.saturating_duration_since(entry.last) >= limits.failed_login_window {
            entry.count = 0;
        }
        entry.count += 1;
        entry.last = now;
        entry.next_try = now + locked_retry_interval(limits);
        if entry.count == limits.max_failed_logins {
            tracing::warn!(
                client = %ip,
                user,
                failures = entry.count,
                window_s = limits.failed_login_window.as_secs(),
                retry_every_ms = locked_retry_interval(limits).as_millis() as u64,
                "logins of this user from this address slowed down: too many failures"
            );
        }
    }

    /// A login of `user` from `ip` succeeded: its failures are forgiven.
    pub fn login_succeeded(&self, ip: IpAddr, user: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ip, user.into()));
    }
}

/// How often a locked-out user may try from one address: the rate of failures that locked it out.
fn locked_retry_interval(limits: &Limits) -> Duration {
    limits.failed_login_window / limits.max_failed_logins.max(1)
}

fn refusal(message: String) -> PgError {
    METRICS.clients_refused.with_label_values(&["53300"]).inc();
    PgError::fatal("53300", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_rate_then_refills() {
        let start = Instant::now();
        let mut bucket = Bucket::full(3, start);
        assert!((0..3).all(|_| bucket.take(3, start)));
        assert!(!bucket.take(3, start));
        assert!(bucket.take(3, start + Duration::from_millis(400)));
        assert!(!bucket.take(3, start + Duration::from_millis(400)));
    }

    #[test]
    fn failed_logins_slow_one_user_from_one_address_until_forgiven() {
        let limits = Limits {
            max_failed_logins: 2,
            failed_login_window: Duration::from_millis(400),
            ..Limits::default()
        };
        let admission = Admission::default();
        let (ip, other): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        admission.login_failed(ip, "ann", &limits);
        assert!(admission.login_allowed(ip, "ann", &limits).is_ok());
        admission.login_failed(ip, "ann", &limits);
        let refused = admission.login_allowed(ip, "ann", &limits).unwrap_err();
        assert_eq!(refused.code, "28000");
        // Other users from the address, and the user from other addresses, are not affected.
        assert!(admission.login_allowed(ip, "bob", &limits).is_ok());
        assert!(admission.login_allowed(other, "ann", &limits).is_ok());
        // One attempt per window / max (200 ms) is let through, and only one.
        std::thread::sleep(Duration::from_millis(210));
        assert!(admission.login_allowed(ip, "ann", &limits).is_ok());
        assert!(admission.login_allowed(ip, "ann", &limits).is_err());
        admission.login_succeeded(ip, "ann");
        assert!(admission.login_allowed(ip, "ann", &limits).is_ok());
    }
}
