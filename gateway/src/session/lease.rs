//! The life of the session's server connection: routed and checked out for an idle client's next exchange,
//! given the session's settings, released when the client is idle again (after reading back what the
//! session may have changed), and handled when it breaks or the client leaves.

use super::routing::Route;
use super::state::Own;
use super::{End, Session};
use crate::metrics::METRICS;
use crate::pool::Lease;
use crate::protocol::{self, tag, PgError, TxStatus};
use bytes::Buf;

impl Session {
    /// Routes the client's next exchange and checks out a server connection for it; on failure answers that
    /// request with the error. A replica that cannot give a connection is banned and the choice made again.
    pub(super) async fn attach(&mut self) {
        // Let the client see answers already due before it waits for a connection.
        if !self.io.to_client.is_empty() {
            self.io.flush_client().await;
        }
        if self.shared.is_paused() {
            self.shared.wait_unpaused().await;
        }
        self.follow_reload();
        let regions = self.regions.clone();
        let mut attempts = 0;
        let mut stale_checkouts = 0;
        let mut replays_failed = 0;
        let result = loop {
            attempts += 1;
            let decision = if stale_checkouts >= 3 {
                // Replicas kept going over the budget while connections were found for them.
                super::routing::primary(&regions, regions::Reason::OverBudget)
            } else {
                match self.decide(&regions) {
                    Ok(decision) => decision,
                    Err(error) => break Err(error),
                }
            };
            self.record(&decision, &regions);
            let (pool, route) = self.target_pool(&decision, &regions);
            match pool.checkout().await {
                // A replica fits the read's budget at the decision; waiting for a free connection, or opening
                // one (a TCP and authentication exchange over the link), takes time during which a replica
                // whose replay stalled grows staler. Past the instant it goes over the budget, the connection
                // goes back unused (it is idle and clean) and the read is routed again, so that no read starts
                // on data older than its budget.
                Ok(lease)
                    if decision
                        .fresh_until
                        .is_some_and(|until| std::time::Instant::now() > until) =>
                {
                    lease.release();
                    stale_checkouts += 1;
                }
                Ok(mut lease) => match self.settings.bring(&mut lease).await {
                    Ok(()) => break Ok((lease, route)),
                    // The connection is closed (dropped); another may take the settings, once.
                    Err(error) if replays_failed == 0 => {
                        replays_failed += 1;
                        tracing::warn!(code = %error.code, reason = %error.message, "retrying the session's settings on another server connection");
                    }
                    Err(error) => break Err(error),
                },
                Err(error) => match route {
                    Route::Replica(in_flight) if attempts <= 3 => {
                        regions.ban(in_flight.id(), &error.to_client().message);
                    }
                    _ => break Err(error.to_client()),
                },
            }
        };
        match result {
            Ok((lease, route)) => self.take_lease(lease, route),
            Err(error) => {
                METRICS.error_sent(&error.code);
                error.encode(&mut self.io.to_client);
                match protocol::peek_header(&self.io.from_client) {
                    Some(Ok((tag::QUERY | tag::FUNCTION_CALL, len))) => {
                        self.io.from_client.advance(len);
                        protocol::ready_for_query(&mut self.io.to_client, self.state.status());
                    }
                    _ => self.discard_until_sync = true,
                }
            }
        }
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
            self.pool = self.shared.pool(&config.primary.url, &user, &database);
            self.replicas = self.shared.has_replicas();
            self.regions = self.shared.regions();
            self.observer.slow_after = config.log.slow_statement;
            self.batching = !config.batching.tables.is_empty();
        }
    }

    /// Returns the server connection to the pool once the client is idle between transactions. True when it
    /// did.
    pub(super) fn maybe_release(&mut self) -> bool {
        let Some(lease) = self.lease.as_mut() else {
            return false;
        };
        if self.pinned.is_some()
            || !self.state.settled()
            || !self.io.between_messages()
            || !self.io.to_server.is_empty()
        {
            return false;
        }
        if !lease.conn().read_buf().is_empty()
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
        tracing::warn!(%server, reason, status = %(status.byte() as char), "server connection lost");
        let retried = status.is_idle() && self.retry_elsewhere(reason);
        self.lease = None;
        self.route = None;
        self.reads.draining = false;
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
            return Err(End::Fatal(PgError::fatal(
                "08006",
                format!("regiongate: the server connection was lost ({reason}); {gone}"),
            )));
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
                tracing::info!(
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
