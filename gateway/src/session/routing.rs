//! Read routing inside a session: which server the next exchange goes to, and the session state routing
//! needs (budget, read-your-writes position, a retry of a read whose replica failed, a deferred BEGIN).
//!
//! The decision is made when an idle client's next exchange needs a server connection: every complete message
//! up to the exchange's end (Sync, or the Query) is classified, and a write anywhere sends the whole exchange
//! to the primary. A transaction stays on the server it started on, because the lease is held until the
//! client is idle again. A write pipelined behind reads that went to a replica waits until the replica has
//! answered them, then goes to the primary.

use super::state::Own;
use super::Session;
use crate::metrics::METRICS;
use crate::pool::Pool;
use crate::protocol::{self, tag, PgError, TxStatus};
use crate::route::{hint::Hint, Access, Class};
use bytes::{Bytes, BytesMut};
use regions::{Decision, Lsn, ReadRequest, Reason, ReplicaId, Target};
use std::sync::Arc;
use std::time::Duration;

/// Where the attached server connection is.
pub(super) enum Route {
    Primary,
    /// The in-flight guard also names the regions the replica belongs to, which a reload may have replaced.
    Replica(regions::InFlight),
}

/// Routing state of one session.
#[derive(Default)]
pub(super) struct Reads {
    /// The staleness budget from the configuration for this user and database.
    pub budget: Duration,
    /// `SET regiongate.max_lag`, overriding the budget.
    pub session_max_lag: Option<Duration>,
    /// Read your writes: the WAL position after the session's last write.
    pub min_lsn: Option<Lsn>,
    /// The current primary exchange wrote: capture the WAL position before releasing.
    pub wrote: bool,
    /// The client bytes of the exchange running on a replica, kept until the first answer reaches the
    /// client, so that it can run elsewhere if the replica fails first.
    pub retry_input: Option<BytesMut>,
    /// The replica that just failed a read, not to be chosen for its retry.
    pub exclude: Option<ReplicaId>,
    /// `BEGIN` answered by the gateway; sent (swallowed) ahead of the transaction's first statement.
    pub deferred_begin: Option<Bytes>,
    /// A write waits for a replica's answers before the session moves to the primary.
    pub draining: bool,
    /// `regiongate_routed_total` children this session used, so that a decision is counted without a
    /// label lookup (one per transaction otherwise).
    pub counters: Vec<(CounterKey, prometheus::IntCounter)>,
}

impl Reads {
    /// Where an exchange of this class goes, given the session's routing state and the regions' picture:
    /// writes, primary hints and transactions that are not read only to the primary; reads to the nearest
    /// replica within their budget (a view read by the freshness of its views, from `views`).
    pub fn decide<V: std::ops::Deref<Target = views::Views>>(
        &mut self,
        class: &Class,
        regions: &regions::Regions,
        views: impl FnOnce() -> V,
    ) -> Result<Decision, regions::NoFit> {
        // An explicit transaction goes to the primary unless it is read only.
        let in_transaction = self.deferred_begin.is_some();
        if class.hint == Some(Hint::Primary) {
            return Ok(primary(regions, Reason::Hint));
        }
        if class.access == Access::Write {
            self.wrote = true;
            return Ok(primary(regions, Reason::Write));
        }
        if in_transaction && !class.read_only_transaction {
            // Writes later in the transaction are noted as they pass (see `admit`).
            return Ok(primary(regions, Reason::Write));
        }
        let max_lag = match class.hint {
            Some(Hint::MaxLag(lag)) => lag,
            _ => self.session_max_lag.unwrap_or(self.budget),
        };
        let request = ReadRequest {
            max_lag,
            min_lsn: if regions.routing.read_your_writes {
                self.min_lsn
            } else {
                None
            },
            exclude: self.exclude,
        };
        // A read of views only is judged by the views' freshness on each replica, unless a hint set a lag.
        if class.views != 0 && !matches!(class.hint, Some(Hint::MaxLag(_))) {
            let views = views();
            let now = std::time::Instant::now();
            let fresh = |replica: ReplicaId| views.fits(class.views, replica, now);
            regions.choose_with(&request, Some(&fresh))
        } else {
            regions.choose(&request)
        }
    }

    /// Read your writes: later reads wait for a replica at this WAL position (or later).
    #[inline]
    pub fn wrote_at(&mut self, lsn: Lsn) {
        self.min_lsn = Some(self.min_lsn.map_or(lsn, |old| old.max(lsn)));
    }
}

/// A decision for the primary.
pub(super) fn primary(regions: &regions::Regions, reason: Reason) -> Decision {
    Decision {
        target: Target::Primary,
        reason,
        region: regions.primary_region.clone(),
        fresh_until: None,
    }
}

/// Labels of a routing counter: region (by name), primary or replica, reason.
pub(super) type CounterKey = (Option<Arc<str>>, bool, Reason);

impl Session {
    pub(super) fn routing_enabled(&self) -> bool {
        self.replicas && self.pinned.is_none()
    }

    /// The class of one client message, if it carries a statement. `shape` is the Query's shape hash when the
    /// caller has it already.
    pub(super) fn message_class(
        &self,
        tag: u8,
        message: &[u8],
        shape: Option<u64>,
    ) -> Option<Class> {
        let body = protocol::body(message);
        match tag {
            tag::QUERY => protocol::query_text(body).map(|text| match shape {
                Some(shape) => self.shared.classifier.load().classify_shaped(text, shape),
                None => self.shared.classifier.load().classify(text),
            }),
            tag::PARSE => {
                let (_, rest) = protocol::cstr(body)?;
                let (text, _) = protocol::cstr(rest)?;
                Some(self.shared.classifier.load().classify(text))
            }
            tag::BIND => {
                let (_, rest) = protocol::cstr(body)?;
                let (name, _) = protocol::cstr(rest)?;
                self.statements.get(name).and_then(|s| s.class)
            }
            tag::FUNCTION_CALL => Some(Class {
                access: Access::Write,
                hint: None,
                bare_begin: false,
                read_only_transaction: false,
                views: 0,
            }),
            _ => None,
        }
    }

    /// The combined class of the client's next exchange: its complete messages up to a Sync or Query.
    fn next_exchange_class(&self) -> Class {
        let mut combined = Class {
            access: Access::Any,
            hint: None,
            bare_begin: false,
            read_only_transaction: false,
            views: 0,
        };
        // Views read by the exchange's statements; any read of something else makes it a plain read.
        let mut only_views = true;
        let mut at = 0;
        let buffer = &self.io.from_client;
        while let Some(Ok((message_tag, len))) = protocol::peek_header(&buffer[at..]) {
            if buffer.len() - at < len {
                break;
            }
            if let Some(class) = self.message_class(message_tag, &buffer[at..at + len], None) {
                combined.access = combined.access.and(class.access);
                combined.hint = combined.hint.or(class.hint);
                combined.read_only_transaction |= class.read_only_transaction;
                if class.access == Access::Read {
                    only_views &= class.views != 0;
                    combined.views |= class.views;
                }
            }
            at += len;
            if matches!(message_tag, tag::SYNC | tag::QUERY | tag::FUNCTION_CALL) {
                break;
            }
        }
        if !only_views {
            combined.views = 0;
        }
        combined
    }

    /// Where the next exchange goes.
    pub(super) fn decide(&mut self, regions: &regions::Regions) -> Result<Decision, PgError> {
        if !self.routing_enabled() {
            let reason = if self.pinned.is_some() {
                Reason::Write
            } else {
                Reason::NoReplicas
            };
            return Ok(primary(regions, reason));
        }
        let class = self.next_exchange_class();
        let shared = &self.shared;
        self.reads
            .decide(&class, regions, || shared.views())
            .map_err(|no_fit| PgError::error("57P03", format!("regiongate: {no_fit}")))
    }

    /// Counts and logs a routing decision.
    pub(super) fn record(&mut self, decision: &Decision, regions: &regions::Regions) {
        let role = match decision.target {
            Target::Primary => "primary",
            Target::Replica(_) => "replica",
        };
        let region = decision.region.as_deref().unwrap_or("unknown");
        let primary = role == "primary";
        // Every request passes here: find the counter without cloning the region (regions are shared Arcs, so
        // the pointer comparison decides nearly always).
        let same_region = |known: &Option<Arc<str>>| match (known, &decision.region) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            (a, b) => a.is_none() && b.is_none(),
        };
        match self.reads.counters.iter().find(|((known, p, reason), _)| {
            *p == primary && *reason == decision.reason && same_region(known)
        }) {
            Some((_, counter)) => counter.inc(),
            None => {
                let counter =
                    METRICS
                        .routed
                        .with_label_values(&[region, role, decision.reason.label()]);
                counter.inc();
                let key: CounterKey = (decision.region.clone(), primary, decision.reason);
                self.reads.counters.push((key, counter));
            }
        }
        let server = match decision.target {
            Target::Primary => &regions.primary_url,
            Target::Replica(id) => &regions.replica_urls[id],
        };
        tracing::debug!(%server, region, role, reason = decision.reason.label(), "routed");
    }

    /// The pool and route for a decision.
    pub(super) fn target_pool(
        &self,
        decision: &Decision,
        regions: &Arc<regions::Regions>,
    ) -> (Arc<Pool>, Route) {
        match decision.target {
            Target::Primary => (self.pool.clone(), Route::Primary),
            Target::Replica(id) => (
                self.shared.pool(
                    &regions.replica_urls[id],
                    &self.pool.key.user,
                    &self.pool.key.database,
                ),
                Route::Replica(regions.start_query(id)),
            ),
        }
    }

    /// Called for each client message about to be forwarded. Returns false when the message must wait: it
    /// needs the primary, the session is on a replica between transactions, so it waits for the replica's
    /// answers and a release.
    pub(super) fn admit(&mut self, message_tag: u8, len: usize, shape: Option<u64>) -> bool {
        if !self.routing_enabled()
            || !matches!(
                message_tag,
                tag::QUERY | tag::PARSE | tag::BIND | tag::FUNCTION_CALL
            )
        {
            return true;
        }
        let Some(class) = self.message_class(message_tag, &self.io.from_client[..len], shape)
        else {
            return true;
        };
        let needs_primary = class.access == Access::Write || class.hint == Some(Hint::Primary);
        match self.route {
            Some(Route::Replica(_))
                if needs_primary && self.state.status().is_idle() && !self.state.in_exchange() =>
            {
                self.reads.draining = true;
                false
            }
            Some(Route::Primary) if class.access == Access::Write => {
                self.reads.wrote = true;
                true
            }
            _ => true,
        }
    }

    /// Keeps a copy of what the client sent while a replica has not answered yet.
    pub(super) fn remember_for_retry(&mut self, message: &[u8]) {
        if let Some(input) = self.reads.retry_input.as_mut() {
            input.extend_from_slice(message);
        }
    }

    /// The replica failed before the client saw any answer: ban it and put the client's bytes back, so the
    /// exchange runs elsewhere. True when it did.
    pub(super) fn retry_elsewhere(&mut self, reason: &str) -> bool {
        let Some(Route::Replica(in_flight)) = &self.route else {
            return false;
        };
        let (regions, id) = (in_flight.regions().clone(), in_flight.id());
        regions.ban(id, reason);
        let Some(input) = self.reads.retry_input.take() else {
            return false;
        };
        if input.is_empty() || self.reads.exclude.is_some() {
            return false; // one retry per exchange
        }
        tracing::info!(replica = %regions.replica_urls[id], reason, "retrying a read elsewhere");
        let mut requeued = input;
        requeued.extend_from_slice(&self.io.from_client);
        self.io.from_client = requeued;
        self.reads.exclude = Some(id);
        self.state.clear();
        true
    }

    /// The client got an answer from a replica: no retry any more; the replica is healthy.
    pub(super) fn answered(&mut self) {
        if self.reads.retry_input.take().is_some() {
            if let Some(Route::Replica(in_flight)) = &self.route {
                in_flight.regions().served(in_flight.id());
            }
        }
        self.reads.exclude = None;
    }

    /// Before a primary connection that wrote is released: ask for the WAL position (read your writes).
    /// True when it asked (the release waits for the answer).
    pub(super) fn capture_write_position(&mut self) -> bool {
        if !self.reads.wrote || !matches!(self.route, Some(Route::Primary)) {
            return false;
        }
        self.reads.wrote = false;
        if !self.regions.routing.read_your_writes {
            return false;
        }
        self.send_own_query(crate::server::WAL_POSITION, Own::Position);
        true
    }

    /// A bare `BEGIN` from an idle client is answered here: whether the transaction may read from a replica
    /// depends on its next statement (`SET TRANSACTION READ ONLY`). True when it took the message.
    pub(super) fn defer_begin(&mut self, len: usize) -> bool {
        if !self.routing_enabled()
            || !self.state.status().is_idle()
            || self.reads.deferred_begin.is_some()
        {
            return false;
        }
        let is_bare_begin = self
            .message_class(tag::QUERY, &self.io.from_client[..len], None)
            .is_some_and(|c| c.bare_begin);
        if !is_bare_begin {
            return false;
        }
        let message = self.io.from_client.split_to(len).freeze();
        self.reads.deferred_begin = Some(message);
        self.state.begin_answered();
        protocol::command_complete(&mut self.io.to_client, "BEGIN");
        protocol::ready_for_query(&mut self.io.to_client, TxStatus::InTransaction);
        true
    }

    /// Sends a deferred BEGIN ahead of the transaction's first statement, its answers swallowed.
    pub(super) fn send_deferred_begin(&mut self) {
        if let Some(begin) = self.reads.deferred_begin.take() {
            self.io.to_server.extend_from_slice(&begin);
            self.state.own(Own::Plain);
        }
    }

    /// `SET regiongate.max_lag = '5s'` and its RESET (read from the captured settings).
    pub(super) fn session_budget_changed(&mut self) {
        self.reads.session_max_lag = self
            .settings
            .current
            .get("regiongate.max_lag")
            .and_then(|value| humantime::parse_duration(value).ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regions with one replica in the home region, not yet seen up by a monitor.
    fn regions(when_no_replica_fits: &str) -> Arc<regions::Regions> {
        let text = format!(
            "primary: {{ url: 'postgres://p/app', region: us-east }}\nhome_region: eu-west\n\
             auth: {{ method: trust }}\nregions:\n  - {{ name: eu-west, replicas: [ 'postgres://r1/app' ] }}\n\
             routing: {{ max_lag: 5s, when_no_replica_fits: {when_no_replica_fits} }}\n"
        );
        let config = crate::config::Config::parse(&text, "test").unwrap();
        crate::Shared::new(config, None, None).regions()
    }

    fn class(access: Access) -> Class {
        Class {
            access,
            hint: None,
            bare_begin: false,
            read_only_transaction: false,
            views: 0,
        }
    }

    fn no_views() -> Arc<views::Views> {
        unreachable!("no statement here reads a view")
    }

    #[tokio::test]
    async fn writes_hints_and_transactions_that_may_write_go_to_the_primary() {
        let regions = regions("error");
        let mut reads = Reads::default();
        let decision = reads
            .decide(&class(Access::Write), &regions, no_views)
            .unwrap();
        assert_eq!(
            (decision.target, decision.reason),
            (Target::Primary, Reason::Write)
        );
        assert!(
            reads.wrote,
            "a write asks for the WAL position before release"
        );
        assert_eq!(decision.region.as_deref(), Some("us-east"));

        let hinted = Class {
            hint: Some(Hint::Primary),
            ..class(Access::Read)
        };
        let decision = reads.decide(&hinted, &regions, no_views).unwrap();
        assert_eq!(decision.reason, Reason::Hint);

        // BEGIN answered by the gateway, then a read: the transaction may write later.
        reads.deferred_begin = Some(Bytes::from_static(b"Q\0\0\0\x0aBEGIN\0"));
        let decision = reads
            .decide(&class(Access::Read), &regions, no_views)
            .unwrap();
        assert_eq!(
            (decision.target, decision.reason),
            (Target::Primary, Reason::Write)
        );
    }

    #[tokio::test]
    async fn reads_are_chosen_by_the_regions_and_fail_when_none_fits_and_that_is_configured() {
        // The replica has not been seen up: with `error`, a read gets the regions' refusal.
        let mut reads = Reads::default();
        assert!(reads
            .decide(&class(Access::Read), &regions("error"), no_views)
            .is_err());
        // A read-only transaction is a read.
        reads.deferred_begin = Some(Bytes::from_static(b"Q\0\0\0\x0aBEGIN\0"));
        let read_only = Class {
            read_only_transaction: true,
            ..class(Access::Read)
        };
        assert!(reads
            .decide(&read_only, &regions("error"), no_views)
            .is_err());
        // With `primary`, it falls back to the primary, saying why.
        reads.deferred_begin = None;
        let decision = reads
            .decide(&class(Access::Read), &regions("primary"), no_views)
            .unwrap();
        assert_eq!(
            (decision.target, decision.reason),
            (Target::Primary, Reason::Down)
        );
        assert!(!reads.wrote);
    }

    #[test]
    fn the_newest_write_position_is_kept() {
        let mut reads = Reads::default();
        reads.wrote_at("0/20".parse().unwrap());
        reads.wrote_at("0/10".parse().unwrap());
        assert_eq!(reads.min_lsn, Some("0/20".parse().unwrap()));
    }
}
