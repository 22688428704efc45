//! The session's side of a drain ([`crate::drain`]): it ends at its next boundary, idle outside a
//! transaction, with `FATAL 57P01`, or at once when the drain cuts.

use super::{End, Session};
use crate::drain::{Outcome, Phase};
use crate::protocol::PgError;

/// What a session knows of the drain.
pub struct Shutdown {
    /// The last phase the session acted on (a kick fires when the drain moves past it).
    pub seen: Phase,
    /// The session was busy (a request, a transaction) when the drain reached it.
    pub busy: bool,
    /// The client has sent no request since it logged in: a drain serves its first one before it closes
    /// it. A client that connects (one in the listen queue when the drain began, too) comes to send
    /// something; closing it in between would fail a reconnecting client (`pgbench -C`, serverless
    /// functions) that a moment earlier would have been served. A client that never sends anything is
    /// closed at the timeout.
    pub grace: bool,
    /// The drain cancelled the session's request at the timeout: it ends as soon as the server says so.
    pub cut: bool,
    /// The session's waker is in its client entry (see [`crate::drain`]).
    pub registered: bool,
    /// The console KILLs so far when the session last looked (see [`crate::drain::Kicked`]).
    pub seen_kills: u8,
}

impl Shutdown {
    pub fn new(phase: Phase, kills: u8) -> Shutdown {
        let draining = phase != Phase::Serving;
        Shutdown {
            seen: Phase::Serving,
            busy: draining,
            grace: true,
            cut: false,
            registered: false,
            seen_kills: kills,
        }
    }
}

/// What a session ended by the console's KILL reads.
pub fn killed() -> PgError {
    PgError::fatal(
        "57P01",
        "terminating connection due to administrator command (regiongate console KILL)",
    )
}

/// What the client reads when the drain closes its connection, as PostgreSQL words it for a terminated
/// backend.
pub fn terminated() -> PgError {
    PgError::fatal(
        "57P01",
        "terminating connection due to administrator command",
    )
}

impl Session {
    /// Between transactions, with nothing sent or owed either way: where a drain may close the client
    /// without cutting anything.
    pub(super) fn at_boundary(&self) -> bool {
        self.state.settled()
            && (self.lease.is_none() || self.io.between_messages())
            && self.reads.deferred_begin.is_none()
            && self.batch.as_ref().is_none_or(|b| b.is_idle())
            && self.discard_until_sync.is_none()
            && self.io.from_client.is_empty()
            && self.io.to_server.is_empty()
    }

    /// Before the session waits: a draining gateway closes it here if it is at a boundary.
    #[inline]
    pub(super) fn drained(&self) -> Option<End> {
        if self.shared.drain.phase() == Phase::Serving || self.shutdown.grace || !self.at_boundary()
        {
            return None;
        }
        Some(End::Drained(if self.shutdown.busy {
            Outcome::Finished
        } else {
            Outcome::Closed
        }))
    }

    /// The drain moved on while the session waited for its client.
    #[cold]
    #[inline(never)]
    pub(super) fn on_drain(&mut self, phase: Phase) -> Result<(), End> {
        if self.handle.entry.is_killed() {
            event!(self, info, "session ended by the admin console's KILL");
            return Err(End::Fatal(Box::new(killed())));
        }
        // Waking takes the waker out of the entry: the next wait puts it back, for the next phase.
        self.shutdown.registered = false;
        self.shutdown.seen_kills = self.shared.drain.kills();
        if phase == self.shutdown.seen {
            // Another session's KILL.
            return Ok(());
        }
        self.shutdown.seen = phase;
        if phase == Phase::Cutting {
            if self.at_boundary() {
                return Err(End::Drained(if self.shutdown.busy {
                    Outcome::Finished
                } else {
                    Outcome::Closed
                }));
            }
            event!(self, warn,
                in_transaction = !self.state.status().is_idle() || self.reads.deferred_begin.is_some(),
                request_running = self.state.owes_answers(),
                "shutdown timeout: closing a client in the middle of its transaction; it rolls back"
            );
            return Err(End::Drained(Outcome::Cut));
        }
        match self.drained() {
            Some(end) => Err(end),
            None => {
                self.shutdown.busy = true;
                Ok(())
            }
        }
    }
}
