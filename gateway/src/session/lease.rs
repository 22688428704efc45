//! The life of the session's server connection: routed and checked out for an idle client's next exchange,
//! given the session's settings, released when the client is idle again (after reading back what the
//! session may have changed), and handled when it breaks or the client leaves.

use super::duplex::Broken;
use super::routing::{Route, Start};
use super::state::Own;
use super::{End, Session};
use crate::metrics::METRICS;
use crate::pool::Lease;
use crate::protocol::{self, tag, PgError, TxStatus};
use crate::server::ServerConn;
use bytes::Buf;
use regions::Reason;

/// Leaves a replica's transaction aborted after the gateway refused its write (the server's log says why).
const ABORT: &str =
    "DO $$BEGIN RAISE EXCEPTION 'regiongate: this transaction could not move to the primary; \
                     its write was refused with 40001'; END$$";

impl Session {
    /// The session holds a connection to a node that no longer takes writes (a failover, a split brain). A
    /// transaction there ends, uncommitted, and so does a session-mode client's session: the client is told,
    /// and nothing of either goes on elsewhere. Between statements (the rest of an exchange that got its
    /// connection just before the change) it goes on: the connection is released at its end.
    #[cold]
    pub(super) fn primary_lost(&self) -> Option<PgError> {
        let lease = self.lease.as_ref()?;
        let in_transaction = self.state.status() != TxStatus::Idle;
        let session_mode = lease.pool().config().mode == crate::config::PoolMode::Session;
        if !in_transaction && !session_mode {
            return None;
        }
        let server = lease.pool().key.server.to_string();
        let now = match &self.regions.picture().writer {
            regions::Writer::Node { url, .. } => format!("writes go to {url} now"),
            regions::Writer::Refused { why } => why.to_string(),
        };
        event!(self, warn, %server, now = %now, in_transaction, "session ended: its server connection is on a former primary");
        let what = if in_transaction {
            "what its transaction did there was not committed"
        } else {
            "its session there ends"
        };
        Some(PgError::fatal(
            "08006",
            format!("regiongate: the server this session ran on ({server}) no longer takes writes ({now}); {what}"),
        ))
    }

    /// Routes the client's next exchange and checks out a server connection for it; on failure answers that
    /// request with the error. A replica that cannot give a connection is banned and the choice made again.
    pub(super) async fn attach(&mut self) {
        // Let the client see answers already due before it waits for a connection.
        if !self.io.to_client.is_empty() {
            self.io.flush_client().await;
        }
        if self.shared.is_paused() {
            // Boxed: rare, and a session's future is as large as the largest thing it awaits.
            Box::pin(self.wait_unpaused()).await;
        }
        self.follow_reload();
        let regions = self.regions.clone();
        let mut attempts = 0;
        let mut stale_checkouts = 0;
        let mut replays_failed = 0;
        let result = loop {
            attempts += 1;
            let (decision, opening) = if stale_checkouts >= 3 {
                // Replicas kept going over the budget while connections were found for them.
                let opening = self.decide(&regions).ok().and_then(|(_, opening)| opening);
                (
                    super::routing::primary(&regions, regions::Reason::OverBudget),
                    opening,
                )
            } else {
                match self.decide(&regions) {
                    Ok(decided) => decided,
                    Err(error) => break Err(error),
                }
            };
            self.record(&decision, &regions);
            let (pool, route) = match self.target_pool(&decision, &regions) {
                Ok(target) => target,
                Err(error) => break Err(error),
            };
            // Without a future when a slot and an idle connection are at hand (nearly always). (The slow
            // checkout's result is done with inside its arm: a value matched on later would be kept, with the
            // room of its error, across the settings' await below, in every session's future.)
            let mut lease = match pool.checkout_now() {
                Some(lease) => lease,
                None => match pool.checkout().await {
                    Ok(lease) => lease,
                    Err(error) => match route {
                        Route::Replica(in_flight) if attempts <= 3 => {
                            regions.ban(in_flight.id(), &error.to_client().message);
                            continue;
                        }
                        _ => break Err(error.to_client()),
                    },
                },
            };
            // A replica fits the read's budget at the decision; waiting for a free connection, or opening one
            // (a TCP and authentication exchange over the link), takes time during which a replica whose
            // replay stalled grows staler. Past the instant it goes over the budget, the connection goes back
            // unused (it is idle and clean) and the read is routed again, so that no read starts on data older
            // than its budget.
            if decision
                .fresh_until
                .is_some_and(|until| std::time::Instant::now() > until)
            {
                lease.release();
                stale_checkouts += 1;
                continue;
            }
            if self.settings.in_step(&mut lease) {
                break Ok((lease, route, decision, opening));
            }
            match self.settings.bring(&mut lease).await {
                Ok(()) => break Ok((lease, route, decision, opening)),
                // The connection is closed (dropped); another may take the settings, once.
                Err(error) if replays_failed == 0 => {
                    replays_failed += 1;
                    event!(self, warn, code = %error.code, reason = %error.message, "retrying the session's settings on another server connection");
                }
                Err(error) => break Err(error),
            }
        };
        match result {
            Ok((lease, route, decision, opening)) => {
                if self.reads.explain {
                    self.explain(&decision, &regions);
                }
                if let Some(stale) = decision.stale {
                    self.stale_notice(stale, &decision);
                }
                self.open_transaction(opening, &decision);
                self.take_lease(lease, route);
            }
            Err(error) => self.answer_error(error, TxStatus::Idle),
        }
    }

    /// PAUSE (or SUSPEND) holds the next transaction: the client shows as waiting, and its pool counts it.
    async fn wait_unpaused(&mut self) {
        self.handle.entry.set_waiting(true);
        self.pool.waiting_outside(true);
        self.shared.wait_unpaused().await;
        self.pool.waiting_outside(false);
        self.handle.entry.set_waiting(false);
    }

    /// Answers the client's next request (a Query, or an extended exchange up to its Sync) with an error the
    /// gateway found, instead of running it; `status` is the transaction status the exchange's Sync reports.
    fn answer_error(&mut self, error: PgError, status: TxStatus) {
        self.alone_over();
        METRICS.error_sent(&error.code);
        error.encode(&mut self.io.to_client);
        match protocol::peek_header(&self.io.from_client) {
            Some(Ok((tag::QUERY | tag::FUNCTION_CALL, len))) => {
                self.io.from_client.advance(len);
                protocol::ready_for_query(&mut self.io.to_client, self.state.status());
            }
            _ => self.discard_until_sync = Some(status),
        }
    }

    /// The first write of a transaction on a replica: open a transaction on the primary, send it what the
    /// client sent the replica, and compare the answers (see [`super::replay`]). Equal, the transaction goes
    /// on there and the replica's is rolled back; different (or not replayable, or the replay failed), both
    /// are rolled back on the servers and the write is answered with 40001, leaving the client's transaction
    /// aborted as PostgreSQL would after an error.
    pub(super) async fn move_to_primary(&mut self) -> Result<(), End> {
        self.reads.moving = false;
        // A transaction the replica failed meanwhile stays there: the replica answers the write (25P02).
        if self.state.status() != TxStatus::InTransaction {
            self.state.take_replay();
            return Ok(());
        }
        let Some(mut replay) = self.state.take_replay() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        if let Some(why) = replay.refused() {
            self.refuse_write(format!(
                "regiongate: could not serialize access: this transaction read on a replica and cannot move to \
                 the primary for its write, because {why}"
            ));
            return Ok(());
        }
        let pool = self.primary_pool(&self.regions.clone());
        let checked_out = match pool {
            Err(error) => Err(error),
            Ok(pool) => match pool.checkout().await {
                Ok(mut lease) => match self.settings.bring(&mut lease).await {
                    Ok(()) => Ok(lease),
                    Err(error) => Err(error),
                },
                Err(error) => Err(error.to_client()),
            },
        };
        let lease = match checked_out {
            Ok(lease) => lease,
            Err(error) => {
                self.refuse_write(format!(
                    "regiongate: could not serialize access: this transaction read on a replica and could not \
                     move to the primary for its write: {}",
                    error.message
                ));
                return Ok(());
            }
        };
        let status = self.state.status();
        let replica_lease = self.lease.replace(lease);
        let replica_route = self.route.replace(Route::Primary);
        let target = self.conn().cancel_target();
        self.handle.entry.set_server(Some(target));
        // Send it all again, as the client sent it: its statements are prepared and named for this connection
        // on the way, as for any client message.
        let messages = replay.start_replay();
        let begin = replay.begin.clone();
        let requests = replay.requests();
        self.state.start_recording(replay);
        if let Some(begin) = begin {
            self.reads.deferred_begin = Some(begin);
            self.send_deferred_begin();
        }
        let detecting = self.observer.pause_detection();
        let mut at = 0;
        while let Some(Ok((message_tag, len))) = protocol::peek_header(&messages[at..]) {
            let message = messages.slice(at..at + len);
            at += len;
            let query = (message_tag == tag::QUERY)
                .then(|| self.observer.query(&message))
                .flatten();
            // These messages passed here once already: an error now is the gateway's own.
            if let Err(error) = self.handle_message(message_tag, message, query) {
                return Err(End::Fatal(Box::new(error)));
            }
        }
        self.observer.resume_detection(detecting);
        while !self.state.quiet() {
            self.flush_now()?;
            self.wait_io().await?;
        }
        let replayed_in_transaction = self.state.status() == TxStatus::InTransaction;
        let verdict = match self.state.take_replay() {
            Some(replay) if replayed_in_transaction => replay
                .verdict(|name| {
                    let text = self.statements.get(name)?.text()?;
                    Some(String::from_utf8_lossy(&text).into_owned())
                })
                .map_err(|differs| differs.to_string()),
            _ => Err("its replay on the primary failed".to_string()),
        };
        match verdict {
            Ok(()) => {
                if let Some(lease) = replica_lease {
                    lease.clean_up(true, false);
                }
                drop(replica_route);
                if let Some(transaction) = self.reads.transaction.as_mut() {
                    transaction.start = Start::Moved;
                }
                super::routing::count_transaction("replica", "moved");
                let regions = self.regions.clone();
                self.record(&super::routing::primary(&regions, Reason::Moved), &regions);
                event!(self, info,
                    requests,
                    elapsed_ms = regions::millis(started.elapsed()),
                    "transaction moved to the primary at its first write: the replica's answers held there"
                );
            }
            Err(why) => {
                // Back to the replica, where the client's transaction goes on, aborted by the gateway.
                if let Some(primary) = std::mem::replace(&mut self.lease, replica_lease) {
                    primary.clean_up(true, false);
                }
                self.route = replica_route;
                if let Some(lease) = self.lease.as_mut() {
                    let target = lease.conn().cancel_target();
                    self.handle.entry.set_server(Some(target));
                }
                self.state.set_status(status);
                self.refuse_write(format!(
                    "regiongate: could not serialize access: this transaction read on a replica, and {why}; \
                     retry the transaction"
                ));
            }
        }
        Ok(())
    }

    /// The write of a transaction that could not move is answered with 40001, and the transaction is left
    /// aborted on its replica (a statement that fails on purpose), so that what follows is answered as
    /// PostgreSQL answers it in an aborted transaction, until the client's ROLLBACK.
    fn refuse_write(&mut self, message: String) {
        if let Some(transaction) = self.reads.transaction.as_mut() {
            transaction.start = Start::Aborted;
        }
        super::routing::count_transaction("replica", "aborted");
        event!(self, warn, reason = %message, "a transaction's write refused: it read on a replica");
        self.send_own_query(ABORT, Own::Abort);
        self.state.set_status(TxStatus::Failed);
        self.answer_error(PgError::error("40001", message), TxStatus::Failed);
    }

    /// A read served over its budget because no node takes writes: the client is told how stale it may be.
    fn stale_notice(&mut self, stale: std::time::Duration, decision: &regions::Decision) {
        crate::metrics::METRICS
            .stale_reads
            .with_label_values(&[decision.region.as_deref().unwrap_or("unknown")])
            .inc();
        let why = match &self.regions.picture().writer {
            regions::Writer::Refused { why } => why.to_string(),
            regions::Writer::Node { .. } => "the primary is back".to_string(),
        };
        let notice = PgError {
            severity: "NOTICE",
            ..PgError::error(
                "01000",
                format!(
                    "regiongate: this read may be up to {:.3} s stale, more than its budget: it was served by a \
                     replica in {} because {why}",
                    stale.as_secs_f64(),
                    decision.region.as_deref().unwrap_or("an unknown region"),
                ),
            )
        };
        notice.encode_notice(&mut self.io.to_client);
    }

    /// The session holds a server connection (with its settings) from now on, until it is released.
    pub(super) fn take_lease(&mut self, mut lease: Lease, route: Route) {
        self.handle
            .entry
            .set_server(Some(lease.conn().cancel_target()));
        if matches!(route, Route::Replica(_)) {
            self.reads.retry_input = Some(bytes::BytesMut::new());
        }
        self.route = Some(route);
        self.lease = Some(lease);
        self.reads.chosen_for_next = true;
        self.send_deferred_begin();
        METRICS.transactions.inc();
    }

    /// Rereads what the session keeps of the configuration after a reload (an atomic load otherwise).
    pub(super) fn follow_reload(&mut self) {
        if self.pool_generation != self.shared.generation() {
            // A reload may have replaced the primary's pool (new settings or a new primary).
            self.pool_generation = self.shared.generation();
            let (user, database) = (self.pool.key.user.clone(), self.pool.key.database.clone());
            let config = self.shared.config.load_full();
            // Limits, budgets and N+1 detection as a new session would get them, from this transaction on.
            self.config = config.clone();
            self.observer.follow(config.clone());
            self.statements
                .set_max(config.limits.max_prepared_statements);
            self.regions = self.shared.regions();
            let primary = self
                .regions
                .writer()
                .url()
                .cloned()
                .unwrap_or(config.primary.url.clone());
            self.pool = self.shared.pool(&primary, &user, &database);
            self.writer_epoch = 0;
            self.replicas = self.shared.has_replicas();
            self.reads.budget = config.routing.budget_for(&user, &database);
            self.reads.transactions = config.routing.transactions_for(&user, &database);
        }
    }

    /// Returns the server connection to the pool once the client is idle between transactions. True when it
    /// did.
    pub(super) fn maybe_release(&mut self) -> bool {
        // A row that ran alone is answered once the server owes nothing: its lane is free again, even when the
        // connection stays (a transaction or a pinning statement came right behind it).
        if self.state.quiet() {
            self.alone_over();
        }
        if self.lease.is_none()
            || self.pinned.is_some()
            || !self.state.settled()
            || !self.io.between_messages()
            || !self.io.to_server.is_empty()
        {
            return false;
        }
        // The transaction is over: count it and learn from it (before the WAL position's capture, which
        // forgets that the session wrote).
        self.close_transaction();
        if !self.conn().read_buf().is_empty()
            || self.capture_settings()
            || self.capture_write_position()
        {
            return false;
        }
        let discard = self.conn().is_discarded();
        self.settings.capture_over();
        self.handle.entry.set_server(None);
        self.route = None;
        self.reads.draining = false;
        self.reads.retry_input = None;
        self.reads.exclude = None;
        let lease = self.lease.take().expect("checked above");
        if discard {
            drop(lease);
        } else {
            lease.release_at(self.observer.last_answer);
        }
        true
    }

    /// After a request that may have changed settings, asks the server what the session's settings now are,
    /// before the connection goes back to the pool. True when it did.
    fn capture_settings(&mut self) -> bool {
        match self.settings.capture_sql() {
            Some(sql) => {
                self.send_own_query(&sql, Own::Capture);
                true
            }
            None => false,
        }
    }

    /// The server connection broke. Clients outside a transaction get an error for each request in flight
    /// and keep their session; inside a transaction (or pinned) the session state is gone, so the client
    /// connection is closed, as PostgreSQL would.
    pub(super) fn server_lost(&mut self, reason: &str) -> Result<(), End> {
        METRICS.server_lost.inc();
        let server = self
            .lease
            .as_mut()
            .map(|l| l.conn().addr().to_string())
            .unwrap_or_default();
        let status = self.state.status();
        event!(self, warn, %server, reason, status = %(status.byte() as char), "server connection lost");
        let retried = status.is_idle() && self.retry_elsewhere(reason);
        self.alone_over();
        self.lease = None;
        self.route = None;
        self.reads.draining = false;
        self.reads.moving = false;
        self.reads.transaction = None;
        self.settings.capture_over();
        self.handle.entry.set_server(None);
        self.io.server_skip = 0;
        self.io.to_server.clear();
        if retried {
            return Ok(());
        }
        self.reads.retry_input = None;
        // Settings changed since the last capture went with the connection, as the session would have.
        let settings_lost = self.settings.take_touched() || self.state.awaits(Own::Capture);
        if self.fatal_forwarded {
            return Err(End::Backend);
        }
        if !status.is_idle() || self.pinned.is_some() || settings_lost {
            let gone = if !status.is_idle() {
                "the session's transaction is gone"
            } else {
                "the session's settings are gone"
            };
            return Err(End::Fatal(Box::new(PgError::fatal(
                "08006",
                format!("regiongate: the server connection was lost ({reason}); {gone}"),
            ))));
        }
        let error = PgError::error(
            "08006",
            format!(
                "regiongate: the server connection was lost ({reason}) while running this request"
            ),
        );
        let in_exchange = self.state.in_exchange();
        for failed in self.state.abandon() {
            if !failed {
                METRICS.error_sent(&error.code);
                error.encode(&mut self.io.to_client);
            }
            protocol::ready_for_query(&mut self.io.to_client, TxStatus::Idle);
        }
        if in_exchange {
            // Messages since the last Sync were lost; the client's Sync will get its ReadyForQuery from the next
            // server connection, and this error first.
            error.encode(&mut self.io.to_client);
        }
        Ok(())
    }

    /// Cleans up after the client left: an idle connection goes back to the pool; one in a transaction or
    /// with pinned session state is rolled back and reset first; one mid-request is closed (and what it
    /// runs cancelled).
    pub(super) fn finish(&mut self) {
        self.observer
            .finish(&self.shared.nplus1, &self.handle.entry);
        let Some(mut lease) = self.lease.take() else {
            return;
        };
        self.handle.entry.set_server(None);
        let conn = lease.conn();
        let busy = !self.state.quiet()
            || self.io.server_skip > 0
            || self.io.client_skip > 0
            || !conn.is_clean();
        if busy {
            if self.state.owes_answers() && !conn.is_discarded() {
                // A request is running for a client that is gone: stop it now rather than when the server
                // next writes to the closed socket (a pg_sleep holding row locks would run on). The closed
                // connection then ends the backend, which rolls its transaction back.
                let target = conn.cancel_target();
                event!(
                    self,
                    info,
                    server_pid = target.pid,
                    "client left mid-request: cancelling it on the server"
                );
                tokio::spawn(async move {
                    crate::clients::cancel_server(target).await;
                    drop(lease);
                });
            }
            return; // dropping the lease closes the connection
        }
        // The session's changes since its last capture are not known: reset them too.
        let reset = self.pinned.is_some() || self.settings.is_touched();
        let rollback = !self.state.status().is_idle();
        if rollback || reset {
            lease.clean_up(rollback, reset);
        } else {
            lease.release();
        }
    }
}

impl Session {
    /// The server connection attached (called only with one).
    pub(super) fn conn(&mut self) -> &mut ServerConn {
        self.lease
            .as_mut()
            .expect("called with a server attached")
            .conn()
    }

    /// Writes what can be written without waiting.
    pub(super) fn flush_now(&mut self) -> Result<(), End> {
        match self.io.flush_now(self.lease.as_mut().map(Lease::conn)) {
            Ok(()) => Ok(()),
            Err(Broken::Client) => Err(End::Client),
            Err(Broken::Server) => self.server_lost("write failed"),
        }
    }
}
