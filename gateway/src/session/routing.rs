//! Read routing inside a session: which server the next exchange goes to, and the session state routing
//! needs (budget, read-your-writes position, a retry of a read whose replica failed, a deferred BEGIN, the
//! transaction under way).
//!
//! The decision is made when an idle client's next exchange needs a server connection: every complete message
//! up to the exchange's end (Sync, or the Query) is classified, and a write anywhere sends the whole exchange
//! to the primary. A write pipelined behind reads that went to a replica waits until the replica has
//! answered them, then goes to the primary.
//!
//! A transaction starts where its first statement belongs: a read on a replica (unless it is serializable, or
//! its shape wrote recently), anything else on the primary. One that started on a replica and may write is
//! recorded ([`super::replay`]); at its first write it moves to the primary, validated by a replay of what it
//! read (`Session::move_to_primary`), or the write is refused with 40001.

use super::replay::Replay;
use super::state::Own;
use super::Session;
use crate::metrics::METRICS;
use crate::pool::Pool;
use crate::protocol::{self, tag, PgError, TxStatus};
use crate::route::{hint::Hint, Access, Class, Isolation, TxModes, WritingShapes};
use bytes::{Bytes, BytesMut};
use regions::config::TransactionRouting;
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
    /// `SET regiongate.explain = on`: each routing decision is told to the client in a NOTICE.
    pub explain: bool,
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
    /// The modes that BEGIN set.
    pub deferred_modes: TxModes,
    /// A write waits for a replica's answers before the session moves to the primary.
    pub draining: bool,
    /// A write in a transaction on a replica waits for the replica's answers, then the transaction moves.
    pub moving: bool,
    /// The connection held was chosen for the client's next exchange, none of which was sent yet.
    pub chosen_for_next: bool,
    /// `routing.transactions` for this user and database.
    pub transactions: TransactionRouting,
    /// The transaction under way, if it could write: how it started, for its count and its shape's lesson.
    pub transaction: Option<Transaction>,
    /// `regiongate_routed_total` children this session used, so that a decision is counted without a
    /// label lookup (one per transaction otherwise).
    /// (A boxed slice, grown by one at each new child: one word less than a Vec in every session.)
    pub counters: Box<[(CounterKey, prometheus::IntCounter)]>,
}

/// A transaction that could write, as it started.
pub(super) struct Transaction {
    pub start: Start,
    /// The key of its shape in [`WritingShapes`] (None: its first exchange had only its BEGIN).
    pub shape: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Start {
    /// On a replica, recorded; still there.
    Replica,
    /// On a replica, then moved to the primary.
    Moved,
    /// On a replica, and its write was refused (40001).
    Aborted,
    /// On the primary, because its shape wrote recently.
    Predicted,
    /// On the primary for another reason (its first statement, serializable, `routing.transactions`).
    Primary,
}

/// An exchange that opens a transaction.
pub(super) struct Opening {
    /// Its shape wrote recently.
    pub predicted: bool,
    pub shape: Option<u64>,
}

impl Reads {
    /// Where an exchange of this class goes, given the session's routing state and the regions' picture:
    /// writes, primary hints and serializable transactions to the primary, and a transaction that may write
    /// when `routing.transactions` says so or its shape wrote recently; reads, and the transactions they
    /// start, to the nearest replica within their budget (a view read by the freshness of its views, from
    /// `views`). `modes` are the transaction modes in force (the exchange's over the session's).
    pub fn decide<V: std::ops::Deref<Target = views::Views>>(
        &mut self,
        class: &Class,
        modes: TxModes,
        opening: Option<&Opening>,
        regions: &regions::Regions,
        views: impl FnOnce() -> V,
    ) -> Result<Decision, regions::NoFit> {
        if class.hint == Some(Hint::Primary) {
            return Ok(primary(regions, Reason::Hint));
        }
        if class.access == Access::Write {
            self.wrote = true;
            return Ok(primary(regions, Reason::Write));
        }
        if modes.needs_primary() {
            let reason = if modes.read_write {
                Reason::ReadWrite
            } else {
                Reason::Serializable
            };
            return Ok(primary(regions, reason));
        }
        if let Some(opening) = opening.filter(|_| !modes.read_only()) {
            // Writes later in the transaction are noted as they pass (see `admit`).
            if self.transactions == TransactionRouting::Primary {
                return Ok(primary(regions, Reason::Transaction));
            }
            if opening.predicted {
                return Ok(primary(regions, Reason::Predicted));
            }
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

/// A decision for the primary (the node that takes writes now).
pub(super) fn primary(regions: &regions::Regions, reason: Reason) -> Decision {
    Decision {
        target: Target::Primary,
        reason,
        region: regions.picture().primary_region.clone(),
        fresh_until: None,
        stale: None,
    }
}

/// Counts a transaction that could write, by where it started and how it went.
pub(super) fn count_transaction(start: &str, outcome: &str) {
    METRICS
        .transactions_routed
        .with_label_values(&[start, outcome])
        .inc();
}

/// Labels of a routing counter: region (by name), primary or replica, reason.
pub(super) type CounterKey = (Option<Arc<str>>, bool, Reason);

impl Session {
    pub(super) fn routing_enabled(&self) -> bool {
        self.replicas && self.pinned.is_none()
    }

    /// The class of one client message, if it carries a statement. `shape` is the Query's (or Parse's)
    /// statement shape hash when the caller has it already.
    pub(super) fn message_class(
        &self,
        tag: u8,
        message: &[u8],
        shape: Option<u64>,
    ) -> Option<Class> {
        let body = protocol::body(message);
        match tag {
            tag::QUERY => protocol::query_text(body).map(|text| {
                let class = match shape {
                    Some(shape) => self.shared.classifier.load().classify_shaped(text, shape),
                    None => self.shared.classifier.load().classify(text),
                };
                if class.access == Access::Write && !self.statements.sql.is_empty() {
                    self.executes_prepared(text).unwrap_or(class)
                } else {
                    class
                }
            }),
            tag::PARSE => {
                let (_, rest) = protocol::cstr(body)?;
                let (text, _) = protocol::cstr(rest)?;
                let classifier = self.shared.classifier.load();
                Some(match shape {
                    Some(shape) => classifier.classify_shaped(text, shape),
                    None => classifier.classify(text),
                })
            }
            tag::BIND => {
                let (_, rest) = protocol::cstr(body)?;
                let (name, _) = protocol::cstr(rest)?;
                self.statements.get(name).and_then(|s| s.class)
            }
            tag::FUNCTION_CALL => Some(Class {
                access: Access::Write,
                ..Class::default()
            }),
            _ => None,
        }
    }

    /// The class of a Query that EXECUTEs SQL-level prepared statements: each EXECUTE by what its statement
    /// does, the other statements by their own class. None when it executes none the session prepared.
    fn executes_prepared(&self, text: &[u8]) -> Option<Class> {
        use crate::sql::Kind;
        let classifier = self.shared.classifier.load();
        let mut executes = false;
        let mut access = Access::Any;
        // Names this very text prepares or deallocates: the session's table does not say what they run yet.
        let mut renamed: Vec<String> = Vec::new();
        let mut all_renamed = false;
        for range in crate::sql::split(text) {
            let prepared = match crate::sql::classify(text, range.clone()) {
                Kind::Execute { name, .. } if !all_renamed && !renamed.contains(&name) => {
                    self.statements.sql.get(&name)
                }
                Kind::Prepare { name, .. }
                | Kind::Deallocate {
                    name: Some((name, _)),
                } => {
                    renamed.push(name);
                    None
                }
                Kind::Deallocate { name: None } | Kind::DiscardAll => {
                    all_renamed = true;
                    None
                }
                _ => None,
            };
            executes |= prepared.is_some();
            access = access.and(match prepared {
                Some(prepared) => prepared.access,
                None => classifier.classify(&text[range]).access,
            });
        }
        executes.then(|| Class {
            access,
            ..classifier.classify(text)
        })
    }

    /// The combined class of the client's next exchange: its complete messages up to a Sync or Query; and
    /// the shape of its first statement that is not a BEGIN (the transaction's shape, when it opens one).
    fn next_exchange_class(&mut self) -> (Class, Option<u64>) {
        let mut combined = Class::default();
        let mut first_shape = None;
        // Views read by the exchange's statements; any read of something else makes it a plain read.
        let mut only_views = true;
        let mut at = 0;
        let buffer = &self.io.from_client;
        while let Some(Ok((message_tag, len))) = protocol::peek_header(&buffer[at..]) {
            if buffer.len() - at < len {
                break;
            }
            let message = &buffer[at..at + len];
            // Shaped once: the class is looked up by the shape, which also keys the transaction's prediction.
            // A Query through the session's recent shapes, where the same text finds it again when it is
            // forwarded (for N+1 detection), without a second lexing.
            let shape = match message_tag {
                tag::QUERY => protocol::query_text(protocol::body(message))
                    .map(|text| self.observer.shape(text).hash),
                tag::PARSE => self.statement_shape(message_tag, message),
                _ => None,
            };
            if let Some(class) = self.message_class(message_tag, message, shape) {
                combined.access = combined.access.and(class.access);
                combined.hint = combined.hint.or(class.hint);
                combined.begins |= class.begins;
                combined.modes = combined.modes.then(class.modes);
                if first_shape.is_none() && !class.begin {
                    first_shape = shape.or_else(|| self.statement_shape(message_tag, message));
                }
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
        (combined, first_shape)
    }

    /// The shape of the statement a Query, Parse or Bind runs.
    fn statement_shape(&self, message_tag: u8, message: &[u8]) -> Option<u64> {
        let body = protocol::body(message);
        match message_tag {
            tag::QUERY => protocol::query_text(body).map(|t| crate::fingerprint::shape_id(t).hash),
            tag::PARSE => {
                let (_, rest) = protocol::cstr(body)?;
                let (text, _) = protocol::cstr(rest)?;
                Some(crate::fingerprint::shape_id(text).hash)
            }
            tag::BIND => {
                let (_, rest) = protocol::cstr(body)?;
                let (name, _) = protocol::cstr(rest)?;
                let statement = self.statements.get(name)?;
                statement
                    .text()
                    .map(|t| crate::fingerprint::shape_id(&t).hash)
            }
            _ => None,
        }
    }

    /// The session's default transaction modes (`default_transaction_isolation` and the like, from a SET or
    /// the startup options).
    fn session_modes(&self) -> TxModes {
        let settings = &self.settings.current;
        let on = |name: &str| settings.get(name).map(|value| value == "on");
        TxModes {
            isolation: settings
                .get("default_transaction_isolation")
                .and_then(Isolation::from_setting),
            read_only: on("default_transaction_read_only"),
            deferrable: on("default_transaction_deferrable"),
            read_write: false,
        }
    }

    /// Where the next exchange goes, and whether it opens a transaction that could write.
    pub(super) fn decide(
        &mut self,
        regions: &regions::Regions,
    ) -> Result<(Decision, Option<Opening>), PgError> {
        if !self.routing_enabled() {
            let reason = if self.pinned.is_some() {
                Reason::Write
            } else {
                Reason::NoReplicas
            };
            return Ok((primary(regions, reason), None));
        }
        let (class, first_shape) = self.next_exchange_class();
        let opening = self.reads.deferred_begin.is_some() || class.begins;
        // The session's defaults apply where the transaction's statements said nothing; a BEGIN's own modes
        // are set before any statement runs, so a serializable default is not set on the way.
        let modes = self
            .reads
            .deferred_modes
            .then(class.modes)
            .or(self.session_modes());
        let opening = (opening && !modes.read_only()).then(|| {
            let key = &self.pool.key;
            let shape = first_shape.map(|s| WritingShapes::key(&key.user, &key.database, s));
            Opening {
                predicted: shape.is_some_and(|s| self.shared.writing_shapes.predicts_write(s)),
                shape,
            }
        });
        let shared = &self.shared;
        let decision = self
            .reads
            .decide(&class, modes, opening.as_ref(), regions, || shared.views())
            .map_err(|no_fit| PgError::error("57P03", format!("regiongate: {no_fit}")))?;
        Ok((decision, opening))
    }

    /// A transaction that could write starts on the server chosen for it (called before the lease is taken,
    /// which sends the deferred BEGIN): on a replica it is recorded, so that it can move at its first write.
    pub(super) fn open_transaction(&mut self, opening: Option<Opening>, decision: &Decision) {
        let Some(opening) = opening else {
            return;
        };
        let start = match decision.target {
            Target::Replica(_) => {
                let replay = Replay::new(
                    self.reads.deferred_begin.clone(),
                    self.config.routing.transactions.max_replay_bytes,
                );
                self.state.start_recording(Box::new(replay));
                Start::Replica
            }
            Target::Primary if decision.reason == Reason::Predicted => {
                count_transaction("primary", "predicted");
                Start::Predicted
            }
            Target::Primary => Start::Primary,
        };
        tracing::debug!(
            start = ?start,
            reason = decision.reason.label(),
            region = decision.region.as_deref().unwrap_or("unknown"),
            "transaction started"
        );
        self.reads.transaction = Some(Transaction {
            start,
            shape: opening.shape,
        });
    }

    /// The transaction ended (the connection is about to go back): count it and learn from it whether
    /// transactions of its shape write.
    pub(super) fn close_transaction(&mut self) {
        let Some(transaction) = self.reads.transaction.take() else {
            return;
        };
        self.state.take_replay();
        let wrote = match transaction.start {
            Start::Replica => {
                count_transaction("replica", "read-only");
                false
            }
            Start::Moved | Start::Aborted => true,
            Start::Predicted => self.reads.wrote,
            Start::Primary => return,
        };
        if let Some(shape) = transaction.shape {
            self.shared.writing_shapes.learn(shape, wrote);
        }
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
                let mut counters = std::mem::take(&mut self.reads.counters).into_vec();
                counters.push((key, counter));
                self.reads.counters = counters.into_boxed_slice();
            }
        }
        let server = match decision.target {
            Target::Primary => &self.pool.key.server,
            Target::Replica(id) => &regions.replica_urls[id],
        };
        tracing::debug!(%server, region, role, reason = decision.reason.label(), "routed");
    }

    /// The pool and route for a decision; for the primary, 57P03 while no node takes writes.
    pub(super) fn target_pool(
        &mut self,
        decision: &Decision,
        regions: &Arc<regions::Regions>,
    ) -> Result<(Arc<Pool>, Route), PgError> {
        Ok(match decision.target {
            Target::Primary => (self.primary_pool(regions)?, Route::Primary),
            Target::Replica(id) => (
                self.shared.pool(
                    &regions.replica_urls[id],
                    &self.pool.key.user,
                    &self.pool.key.database,
                ),
                Route::Replica(regions.start_query(id)),
            ),
        })
    }

    /// The pool of the node that takes writes now, followed when a failover moved them (one integer
    /// comparison otherwise); 57P03, saying why, when no node takes them.
    pub(super) fn primary_pool(
        &mut self,
        regions: &regions::Regions,
    ) -> Result<Arc<Pool>, PgError> {
        if regions.writer_epoch() as u32 != self.writer_epoch {
            let picture = regions.picture();
            let Some(url) = picture.writer.url() else {
                let regions::Writer::Refused { why } = &picture.writer else {
                    unreachable!("a writer without a URL is refused")
                };
                return Err(PgError::error("57P03", format!("regiongate: {why}")));
            };
            // The same node back after an outage had its pools retired meanwhile: a fresh one.
            if *url != self.pool.key.server || self.pool.is_retired() {
                self.pool = self
                    .shared
                    .pool(url, &self.pool.key.user, &self.pool.key.database);
            }
            self.writer_epoch = picture.writer_epoch as u32;
        }
        Ok(self.pool.clone())
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
        // A transaction that may move is judged by whole exchanges, before any of one goes to the replica.
        let exchange_starts = !self.state.in_exchange();
        let movable = exchange_starts
            && self.state.status() == TxStatus::InTransaction
            && matches!(self.route, Some(Route::Replica(_)))
            && self.state.replay().is_some();
        let class = if movable {
            self.next_exchange_class().0
        } else {
            match self.message_class(message_tag, &self.io.from_client[..len], shape) {
                Some(class) => class,
                None => return true,
            }
        };
        let needs_primary = class.access == Access::Write
            || class.hint == Some(Hint::Primary)
            || class.modes.needs_primary();
        let idle_between_exchanges = self.state.status().is_idle() && exchange_starts;
        match self.route {
            // A transaction that comes while the connection of an earlier exchange is still held (pipelined
            // behind it, or while its release waited) waits for that release: it starts where its first
            // statement belongs, as any other.
            Some(_) if class.begins && idle_between_exchanges && !self.reads.chosen_for_next => {
                self.reads.draining = true;
                false
            }
            Some(Route::Replica(_)) if needs_primary && idle_between_exchanges => {
                self.reads.draining = true;
                false
            }
            Some(Route::Replica(_)) if needs_primary && movable => {
                self.reads.moving = true;
                false
            }
            Some(Route::Primary) if class.access == Access::Write => {
                self.reads.wrote = true;
                true
            }
            _ => true,
        }
    }

    /// Keeps a copy of what the client sent while a replica has not answered yet (for a retry elsewhere), and
    /// while a transaction that may move runs on a replica (for its replay).
    #[inline]
    pub(super) fn remember(&mut self, message: &[u8]) {
        self.reads.chosen_for_next = false;
        if let Some(input) = self.reads.retry_input.as_mut() {
            input.extend_from_slice(message);
        }
        if let Some(replay) = self.state.replay() {
            replay.record(message[0], message);
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
        event!(self, info, replica = %regions.replica_urls[id], reason, "retrying a read elsewhere");
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

    /// A `BEGIN` (with any modes) from an idle client is answered here: where the transaction runs depends
    /// on its first statement. True when it took the message.
    pub(super) fn defer_begin(&mut self, len: usize) -> bool {
        if !self.routing_enabled()
            || !self.state.status().is_idle()
            || self.reads.deferred_begin.is_some()
        {
            return false;
        }
        let Some(class) = self
            .message_class(tag::QUERY, &self.io.from_client[..len], None)
            .filter(|c| c.begin)
        else {
            return false;
        };
        let message = self.io.from_client.split_to(len).freeze();
        self.reads.deferred_begin = Some(message);
        self.reads.deferred_modes = class.modes;
        self.state.begin_answered();
        protocol::command_complete(&mut self.io.to_client, "BEGIN");
        protocol::ready_for_query(&mut self.io.to_client, TxStatus::InTransaction);
        true
    }

    /// Sends a deferred BEGIN ahead of the transaction's first statement, its answers swallowed.
    pub(super) fn send_deferred_begin(&mut self) {
        self.reads.deferred_modes = TxModes::default();
        if let Some(begin) = self.reads.deferred_begin.take() {
            self.io.to_server.extend_from_slice(&begin);
            self.state.own(Own::Begin);
        }
    }

    /// `SET regiongate.max_lag = '5s'`, `SET regiongate.explain = on` and their RESET (read from the captured
    /// settings).
    pub(super) fn session_budget_changed(&mut self) {
        let current = &self.settings.current;
        self.reads.session_max_lag = current
            .get("regiongate.max_lag")
            .and_then(|value| humantime::parse_duration(value).ok());
        self.reads.explain = current
            .get("regiongate.explain")
            .and_then(crate::route::parse_bool)
            .unwrap_or(false);
    }

    /// `regiongate.explain`: where the exchange about to run goes, and why, as a NOTICE before its answer.
    #[cold]
    pub(super) fn explain(&mut self, decision: &Decision, regions: &regions::Regions) {
        let (role, server) = match decision.target {
            Target::Primary => ("primary", self.pool.key.server.to_string()),
            Target::Replica(id) => ("replica", regions.replica_urls[id].to_string()),
        };
        let notice = PgError {
            severity: "NOTICE",
            ..PgError::error(
                "00000",
                format!(
                    "regiongate: routed to the {role} {server} in {}: {}",
                    decision.region.as_deref().unwrap_or("an unknown region"),
                    decision.reason.label()
                ),
            )
        };
        notice.encode_notice(&mut self.io.to_client);
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
            ..Class::default()
        }
    }

    fn no_views() -> Arc<views::Views> {
        unreachable!("no statement here reads a view")
    }

    const NO_MODES: TxModes = TxModes {
        isolation: None,
        read_only: None,
        deferrable: None,
        read_write: false,
    };

    fn opening(predicted: bool) -> Opening {
        Opening {
            predicted,
            shape: Some(1),
        }
    }

    #[tokio::test]
    async fn writes_hints_serializable_and_predicted_or_configured_transactions_go_to_the_primary()
    {
        let regions = regions("error");
        let mut reads = Reads::default();
        let decision = reads
            .decide(&class(Access::Write), NO_MODES, None, &regions, no_views)
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
        let decision = reads
            .decide(&hinted, NO_MODES, None, &regions, no_views)
            .unwrap();
        assert_eq!(decision.reason, Reason::Hint);

        // A standby refuses serializable, in a transaction or not, read only and deferrable too.
        let serializable = TxModes {
            isolation: Some(Isolation::Serializable),
            ..NO_MODES
        };
        let read = class(Access::Read);
        for modes in [
            serializable,
            TxModes {
                read_only: Some(true),
                deferrable: Some(true),
                ..serializable
            },
        ] {
            let decision = reads
                .decide(&read, modes, None, &regions, no_views)
                .unwrap();
            assert_eq!(decision.reason, Reason::Serializable, "{modes:?}");
        }

        // A transaction whose shape wrote recently starts on the primary; so does every transaction that may
        // write with `routing.transactions: primary`.
        let decision = reads
            .decide(&read, NO_MODES, Some(&opening(true)), &regions, no_views)
            .unwrap();
        assert_eq!(decision.reason, Reason::Predicted);
        reads.transactions = TransactionRouting::Primary;
        let decision = reads
            .decide(&read, NO_MODES, Some(&opening(false)), &regions, no_views)
            .unwrap();
        assert_eq!(decision.reason, Reason::Transaction);
        // ...unless it is read only.
        let read_only = TxModes {
            read_only: Some(true),
            ..NO_MODES
        };
        assert!(reads
            .decide(&read, read_only, Some(&opening(true)), &regions, no_views)
            .is_err());
    }

    #[tokio::test]
    async fn reads_and_the_transactions_they_open_are_chosen_by_the_regions() {
        // The replica has not been seen up: with `error`, a read gets the regions' refusal...
        let mut reads = Reads::default();
        let read = class(Access::Read);
        assert!(reads
            .decide(&read, NO_MODES, None, &regions("error"), no_views)
            .is_err());
        // ...and so does a transaction it opens (validated: it starts where its first statement belongs).
        assert!(reads
            .decide(
                &read,
                NO_MODES,
                Some(&opening(false)),
                &regions("error"),
                no_views
            )
            .is_err());
        // With `primary`, it falls back to the primary, saying why.
        let decision = reads
            .decide(&read, NO_MODES, None, &regions("primary"), no_views)
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
