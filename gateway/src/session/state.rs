//! What the server connection still owes, and to whom: the protocol state of a session's server side, as a
//! pure type. It is told what was sent (a client's Parse, Sync or Query; one of the gateway's own queries)
//! and fed each message the server answers with; it says what to do with that message ([`Step`]) and keeps
//! the transaction status. No sockets: its tests run on byte scripts.
//!
//! Why it is needed: the gateway sends messages of its own ahead of a client's (a re-prepare, a settings
//! replay or capture, a deferred BEGIN, the WAL position after a write), and their answers must be swallowed
//! while the client's are relayed, in an order only the server decides. The server answers strictly in the
//! order it was asked ("Message Flow" in the protocol documentation), with two rules that shape this type:
//! - in the extended protocol an error makes the server skip every message up to the next Sync, so Parses
//!   queued before that Sync are never answered (and the statements they were creating do not exist);
//! - a simple Query answers with ReadyForQuery even after an error, and nothing of it is skipped.

use super::replay::Replay;
use super::settings::Reset;
use super::statements::Shift;
use crate::protocol::{tag, TxStatus};
use std::collections::VecDeque;
use std::sync::Arc;

/// The gateway's own requests: their answers never reach the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Own {
    /// A re-prepare, a SQL-level PREPARE: nothing to read.
    Plain,
    /// The BEGIN the gateway answered itself, sent ahead of the transaction's first statement: nothing to
    /// read, and it must not fail (the statements behind it would run outside the client's transaction).
    Begin,
    /// The WAL position after a write: its DataRow is read.
    Position,
    /// The session's settings ([`crate::settings::capture_sql`]): its DataRows are read.
    Capture,
    /// The client's reset values after its RESET: its ParameterStatus messages are the client's, and its
    /// failure (the client's transaction failed meanwhile) changes nothing.
    Restore,
    /// A statement that fails on purpose, leaving the client's transaction aborted as PostgreSQL would after
    /// the error the gateway answered: its failure is expected.
    Abort,
}

/// What a client's request may carry besides its place in the queue (boxed: most carry nothing, and the
/// queue moves its entries).
#[derive(Default, Debug)]
pub struct Extra {
    /// Settings the request resets.
    pub reset: Reset,
    /// Names the gateway replaced in the client's Query.
    pub shifts: Vec<Shift>,
}

/// A request whose answer is still to come, in the order the server will answer.
#[derive(Debug)]
enum Pending {
    /// A Parse: answered by ParseComplete (or skipped after an error). `name` is the server-side statement it
    /// creates, forgotten again if the Parse fails.
    Parse {
        swallow: bool,
        name: Option<Arc<str>>,
    },
    /// A Sync, Query or FunctionCall: answered by ReadyForQuery.
    Ready {
        /// The gateway's own, or the client's (None).
        own: Option<Own>,
        /// Query and FunctionCall: an error does not skip later messages.
        simple: bool,
        failed: bool,
        extra: Option<Box<Extra>>,
    },
}

/// What to do with one server message.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Relay it to the client.
    Forward,
    /// Drop it: it answers one of the gateway's own messages.
    Swallow,
    /// A DataRow answering one of the gateway's own queries: read it, do not relay it.
    OwnRow(Own),
    /// A ParameterStatus answering a client's request: relay it; a reported setting changed (maybe inside a
    /// function the gateway cannot see into).
    Reported,
    /// An ErrorResponse (see [`ErrorFor`]).
    Error(ErrorFor),
    /// A ReadyForQuery; the status is taken already.
    Ready(Answered),
}

/// Whose request an ErrorResponse fails.
#[derive(Debug, PartialEq)]
pub struct ErrorFor {
    /// The gateway's own request (None: the client's, or nothing was pending).
    pub own: Option<Own>,
    /// FATAL or PANIC: the server ends the connection.
    pub fatal: bool,
}

/// Which request a ReadyForQuery answered.
#[derive(Debug, PartialEq)]
pub enum Answered {
    /// A client's request (relay the ReadyForQuery), with what it carried.
    Client(Option<Box<Extra>>),
    /// One of the gateway's own (swallow it), and whether it failed.
    Own { own: Own, failed: bool },
    /// Nothing was pending (relayed as it is).
    Unexpected,
}

impl PartialEq for Extra {
    fn eq(&self, other: &Extra) -> bool {
        self.reset == other.reset && self.shifts.len() == other.shifts.len()
    }
}

/// The session's server-side protocol state.
#[derive(Debug)]
pub struct ProtocolState {
    pending: VecDeque<Pending>,
    /// Extended-protocol messages were sent since the last Sync: the server is inside that exchange.
    in_exchange: bool,
    /// The last ReadyForQuery status (or the gateway's, for a BEGIN it answered itself).
    status: TxStatus,
    /// What few exchanges leave: made when first needed (an empty one would take 48 bytes of every idle
    /// client).
    rare: Option<Box<Rare>>,
    /// A transaction on a replica that may move to the primary: what it sent and what it was answered.
    replay: Option<Box<Replay>>,
}

#[derive(Debug, Default)]
struct Rare {
    /// Settings reset by statements bound since the last Sync.
    segment_reset: Reset,
    /// Server-side statements whose Parse failed or was skipped: the connection does not have them.
    forgotten: Vec<Arc<str>>,
}

impl Default for ProtocolState {
    fn default() -> Self {
        ProtocolState {
            // Allocated at the first request, not at login: most clients wait most of the time.
            pending: VecDeque::new(),
            in_exchange: false,
            status: TxStatus::Idle,
            rare: None,
            replay: None,
        }
    }
}

impl ProtocolState {
    // ---- what was sent ---------------------------------------------------------------------------------

    /// A Parse; `swallow` when it is the gateway's (a re-prepare), `name` the server-side statement it
    /// creates (None for the unnamed one).
    #[inline]
    pub fn parse(&mut self, swallow: bool, name: Option<Arc<str>>) {
        self.pending.push_back(Pending::Parse { swallow, name });
        self.in_exchange = true;
    }

    /// Another extended-protocol message (Bind, Describe, Execute, Close, Flush): the exchange goes on.
    #[inline]
    pub fn extended(&mut self) {
        self.in_exchange = true;
    }

    /// A statement bound in this exchange resets settings.
    #[inline]
    pub fn resets(&mut self, reset: Reset) {
        self.rare.get_or_insert_default().segment_reset.add(reset);
    }

    /// The client's Sync: its exchange is answered by one ReadyForQuery.
    #[inline]
    pub fn sync(&mut self) {
        let reset = match &mut self.rare {
            Some(rare) => std::mem::take(&mut rare.segment_reset),
            None => Reset::Nothing,
        };
        self.pending.push_back(client(false, reset, Vec::new()));
        self.in_exchange = false;
    }

    /// The client's Query (or FunctionCall), with what it resets and the names the gateway replaced in it.
    #[inline]
    pub fn query(&mut self, reset: Reset, shifts: Vec<Shift>) {
        self.pending.push_back(client(true, reset, shifts));
    }

    /// The client's Query that resets nothing and was sent as it came (most of them).
    #[inline]
    pub fn plain_query(&mut self) {
        self.pending.push_back(Pending::Ready {
            own: None,
            simple: true,
            failed: false,
            extra: None,
        });
    }

    /// One of the gateway's own simple queries.
    #[inline]
    pub fn own(&mut self, own: Own) {
        self.pending.push_back(Pending::Ready {
            own: Some(own),
            simple: true,
            failed: false,
            extra: None,
        });
    }

    /// A Parse and Sync of the gateway's own, between the client's exchanges: answers swallowed.
    pub fn own_parse_and_sync(&mut self) {
        self.pending.push_back(Pending::Parse {
            swallow: true,
            name: None,
        });
        self.own(Own::Plain);
    }

    /// The gateway answered the client's BEGIN itself (its own BEGIN follows later).
    pub fn begin_answered(&mut self) {
        self.status = TxStatus::InTransaction;
    }

    /// The transaction status the client was last told, when the gateway told it: after a BEGIN it
    /// answered, or an error it answered in the client's transaction.
    pub fn set_status(&mut self, status: TxStatus) {
        self.status = status;
    }

    // ---- a transaction that may move ---------------------------------------------------------------------

    /// From now on the client's messages and the answers it gets are recorded for a replay.
    pub fn start_recording(&mut self, replay: Box<Replay>) {
        self.replay = Some(replay);
    }

    /// The recording, if the transaction is being recorded (or replayed).
    #[inline]
    pub fn replay(&mut self) -> Option<&mut Replay> {
        self.replay.as_deref_mut()
    }

    pub fn take_replay(&mut self) -> Option<Box<Replay>> {
        self.replay.take()
    }

    // ---- what is known -----------------------------------------------------------------------------------

    #[inline]
    pub fn status(&self) -> TxStatus {
        self.status
    }

    /// Nothing owed, no exchange open: the server waits for the next request.
    #[inline]
    pub fn quiet(&self) -> bool {
        self.pending.is_empty() && !self.in_exchange
    }

    /// Quiet and outside a transaction: the connection may go back to the pool.
    #[inline]
    pub fn settled(&self) -> bool {
        self.quiet() && self.status.is_idle()
    }

    #[inline]
    pub fn owes_answers(&self) -> bool {
        !self.pending.is_empty()
    }

    #[inline]
    pub fn in_exchange(&self) -> bool {
        self.in_exchange
    }

    /// The next answer is to one of the gateway's own requests: the server's messages are not the client's.
    #[inline]
    pub fn swallowing(&self) -> bool {
        matches!(
            self.pending.front(),
            Some(Pending::Ready { own: Some(_), .. })
        )
    }

    /// Whether one of the gateway's own requests of this kind is pending.
    #[inline]
    pub fn awaits(&self, kind: Own) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::Ready { own: Some(own), .. } if *own == kind))
    }

    /// Whether a client's request is pending.
    #[inline]
    pub fn client_request_pending(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::Ready { own: None, .. }))
    }

    /// How the gateway's renaming moved text in the client's request being answered.
    #[inline]
    pub fn front_shifts(&self) -> Option<&[Shift]> {
        match self.pending.front() {
            Some(Pending::Ready {
                extra: Some(extra), ..
            }) if !extra.shifts.is_empty() => Some(&extra.shifts),
            _ => None,
        }
    }

    /// Server-side statements found not to exist since the last call.
    #[inline]
    pub fn take_forgotten(&mut self) -> Option<std::vec::Drain<'_, Arc<str>>> {
        let forgotten = &mut self.rare.as_mut()?.forgotten;
        (!forgotten.is_empty()).then(|| forgotten.drain(..))
    }

    // ---- what the server says ----------------------------------------------------------------------------

    /// One server message (`body` after tag and length): what to do with it.
    #[inline]
    pub fn on_message(&mut self, message_tag: u8, body: &[u8]) -> Step {
        match message_tag {
            tag::PARSE_COMPLETE => {
                // ParseComplete answers the oldest Parse still pending.
                let position = self
                    .pending
                    .iter()
                    .position(|p| matches!(p, Pending::Parse { .. }));
                match position.and_then(|p| self.pending.remove(p)) {
                    Some(Pending::Parse { swallow: true, .. }) => Step::Swallow,
                    _ => Step::Forward,
                }
            }
            tag::ERROR_RESPONSE => Step::Error(self.on_error(body)),
            tag::READY_FOR_QUERY => {
                self.status = TxStatus::from_byte(body.first().copied().unwrap_or(b'I'));
                while let Some(entry) = self.pending.pop_front() {
                    match entry {
                        Pending::Parse { name, .. } => self.forget(name),
                        Pending::Ready {
                            own: Some(own),
                            failed,
                            ..
                        } => return Step::Ready(Answered::Own { own, failed }),
                        Pending::Ready {
                            own: None, extra, ..
                        } => return Step::Ready(Answered::Client(extra)),
                    }
                }
                Step::Ready(Answered::Unexpected)
            }
            // Notifications are asynchronous and always the client's.
            tag::NOTIFICATION_RESPONSE => Step::Forward,
            tag::PARAMETER_STATUS => match self.pending.front() {
                // The parameter changes the restoring of its reset values makes are the client's.
                Some(Pending::Ready {
                    own: Some(Own::Restore),
                    ..
                }) => Step::Forward,
                Some(Pending::Ready { own: Some(_), .. }) => Step::Swallow,
                _ => Step::Reported,
            },
            tag::DATA_ROW => match self.pending.front() {
                Some(Pending::Ready {
                    own: Some(own @ (Own::Position | Own::Capture)),
                    ..
                }) => Step::OwnRow(*own),
                Some(Pending::Ready { own: Some(_), .. }) => Step::Swallow,
                _ => Step::Forward,
            },
            _ if self.swallowing() => Step::Swallow,
            _ => Step::Forward,
        }
    }

    fn on_error(&mut self, body: &[u8]) -> ErrorFor {
        let fatal = body
            .windows(6)
            .take(4)
            .any(|w| w == b"FATAL\0" || w.starts_with(b"PANIC\0"));
        // In the extended protocol an error makes the server skip to the next Sync: Parses before it will not
        // be answered, and the statements they were creating do not exist.
        let simple = matches!(
            self.pending.front(),
            Some(Pending::Ready { simple: true, .. })
        );
        if !simple {
            while matches!(self.pending.front(), Some(Pending::Parse { .. })) {
                if let Some(Pending::Parse { name, .. }) = self.pending.pop_front() {
                    self.forget(name);
                }
            }
        }
        let mut own = None;
        if let Some(Pending::Ready {
            own: whose, failed, ..
        }) = self.pending.front_mut()
        {
            *failed = true;
            own = *whose;
        }
        ErrorFor { own, fatal }
    }

    fn forget(&mut self, name: Option<Arc<str>>) {
        if let Some(name) = name {
            self.rare.get_or_insert_default().forgotten.push(name);
        }
    }

    // ---- when the connection goes --------------------------------------------------------------------------

    /// The server connection is gone: for each client request still owed, whether it had failed already (it
    /// got its error). The state starts over, idle.
    pub fn abandon(&mut self) -> Vec<bool> {
        let owed = self
            .pending
            .drain(..)
            .filter_map(|p| match p {
                Pending::Ready {
                    own: None, failed, ..
                } => Some(failed),
                _ => None,
            })
            .collect();
        self.clear();
        self.replay = None;
        owed
    }

    /// Starts over on another server connection (a read retried elsewhere sends its messages again).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.in_exchange = false;
        self.rare = None;
    }
}

#[inline]
fn client(simple: bool, reset: Reset, shifts: Vec<Shift>) -> Pending {
    Pending::Ready {
        own: None,
        simple,
        failed: false,
        extra: (reset != Reset::Nothing || !shifts.is_empty())
            .then(|| Box::new(Extra { reset, shifts })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server message for the script: tag and body.
    fn error(severity: &str, code: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in [(b'S', severity), (b'V', severity), (b'C', code)] {
            body.push(field);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    fn name(text: &str) -> Option<Arc<str>> {
        Some(Arc::from(text))
    }

    /// Feeds a script of server messages; returns each step.
    fn run(state: &mut ProtocolState, script: &[(u8, Vec<u8>)]) -> Vec<Step> {
        script
            .iter()
            .map(|(message_tag, body)| state.on_message(*message_tag, body))
            .collect()
    }

    fn ready(status: u8) -> (u8, Vec<u8>) {
        (tag::READY_FOR_QUERY, vec![status])
    }

    #[test]
    fn a_pipelined_parse_error_skips_to_the_sync_and_forgets_the_statements() {
        let mut state = ProtocolState::default();
        // Parse s1, Parse s2 (fails), Bind, Execute, Sync; then Parse s3, Sync.
        state.parse(false, name("s1"));
        state.parse(false, name("s2"));
        state.extended();
        state.sync();
        state.parse(false, name("s3"));
        state.sync();
        assert!(!state.quiet());
        let steps = run(
            &mut state,
            &[
                (tag::PARSE_COMPLETE, vec![]),
                (tag::ERROR_RESPONSE, error("ERROR", "42601")),
                ready(b'I'),
                (tag::PARSE_COMPLETE, vec![]),
                ready(b'I'),
            ],
        );
        assert_eq!(
            steps,
            vec![
                Step::Forward,
                Step::Error(ErrorFor {
                    own: None,
                    fatal: false
                }),
                Step::Ready(Answered::Client(None)),
                Step::Forward,
                Step::Ready(Answered::Client(None)),
            ]
        );
        let forgotten: Vec<_> = state.take_forgotten().unwrap().collect();
        assert_eq!(forgotten, vec![Arc::from("s2")]);
        assert!(state.take_forgotten().is_none());
        assert!(state.settled());
    }

    #[test]
    fn re_prepares_and_settings_replays_are_swallowed_and_the_client_answers_relayed() {
        let mut state = ProtocolState::default();
        // A settings capture (own Query) behind the client's Parse/Bind/Execute/Sync, which needed a re-prepare.
        state.parse(true, name("s1"));
        state.extended();
        state.sync();
        state.own(Own::Capture);
        let row = b"\0\x01\0\0\0\x01x".to_vec();
        let steps = run(
            &mut state,
            &[
                (tag::PARSE_COMPLETE, vec![]),
                (tag::BIND_COMPLETE, vec![]),
                (tag::DATA_ROW, row.clone()),
                (tag::COMMAND_COMPLETE, b"SELECT 1\0".to_vec()),
                ready(b'I'),
                (tag::ROW_DESCRIPTION, vec![]),
                (tag::DATA_ROW, row),
                (tag::PARAMETER_STATUS, b"DateStyle\0ISO\0".to_vec()),
                (tag::COMMAND_COMPLETE, b"SELECT 1\0".to_vec()),
                ready(b'I'),
            ],
        );
        assert_eq!(
            steps,
            vec![
                Step::Swallow,
                Step::Forward,
                Step::Forward,
                Step::Forward,
                Step::Ready(Answered::Client(None)),
                Step::Swallow,
                Step::OwnRow(Own::Capture),
                Step::Swallow,
                Step::Swallow,
                Step::Ready(Answered::Own {
                    own: Own::Capture,
                    failed: false
                }),
            ]
        );
        assert!(state.take_forgotten().is_none());
    }

    #[test]
    fn the_deferred_begin_is_answered_by_the_gateway_and_its_own_begin_swallowed() {
        let mut state = ProtocolState::default();
        state.begin_answered();
        assert_eq!(state.status(), TxStatus::InTransaction);
        assert!(!state.settled());
        state.own(Own::Begin); // the BEGIN, sent ahead of the first statement
        state.query(Reset::Nothing, Vec::new());
        let steps = run(
            &mut state,
            &[
                (tag::COMMAND_COMPLETE, b"BEGIN\0".to_vec()),
                ready(b'T'),
                (tag::COMMAND_COMPLETE, b"SELECT 0\0".to_vec()),
                ready(b'T'),
            ],
        );
        assert_eq!(
            steps,
            vec![
                Step::Swallow,
                Step::Ready(Answered::Own {
                    own: Own::Begin,
                    failed: false
                }),
                Step::Forward,
                Step::Ready(Answered::Client(None)),
            ]
        );
        assert_eq!(state.status(), TxStatus::InTransaction);
        assert!(state.quiet() && !state.settled());
    }

    #[test]
    fn a_fatal_error_is_reported_as_fatal_inside_and_outside_a_transaction() {
        for status in [b'I', b'T'] {
            let mut state = ProtocolState::default();
            state.query(Reset::Nothing, Vec::new());
            if status == b'T' {
                run(&mut state, &[ready(b'T')]);
                state.query(Reset::Nothing, Vec::new());
            }
            let steps = run(
                &mut state,
                &[(tag::ERROR_RESPONSE, error("FATAL", "57P01"))],
            );
            assert_eq!(
                steps,
                vec![Step::Error(ErrorFor {
                    own: None,
                    fatal: true
                })]
            );
            assert_eq!(state.status(), TxStatus::from_byte(status));
            // The connection closes: the request is owed, and had its error.
            assert_eq!(state.abandon(), vec![true]);
            assert!(state.settled() || status == b'T');
        }
        // A FATAL that ends one of the gateway's own requests is said to be its.
        let mut state = ProtocolState::default();
        state.own(Own::Capture);
        state.query(Reset::Nothing, Vec::new());
        let steps = run(
            &mut state,
            &[(tag::ERROR_RESPONSE, error("PANIC", "XX000"))],
        );
        assert_eq!(
            steps,
            vec![Step::Error(ErrorFor {
                own: Some(Own::Capture),
                fatal: true
            })]
        );
        assert_eq!(state.abandon(), vec![false]);
    }

    #[test]
    fn an_error_mid_pipeline_fails_only_its_own_exchange() {
        let mut state = ProtocolState::default();
        // Three exchanges pipelined: the second's Execute fails.
        for n in 1..=3 {
            state.parse(false, name(&format!("s{n}")));
            state.extended();
            state.sync();
        }
        let steps = run(
            &mut state,
            &[
                (tag::PARSE_COMPLETE, vec![]),
                (tag::BIND_COMPLETE, vec![]),
                (tag::COMMAND_COMPLETE, b"INSERT 0 1\0".to_vec()),
                ready(b'I'),
                (tag::PARSE_COMPLETE, vec![]),
                (tag::BIND_COMPLETE, vec![]),
                (tag::ERROR_RESPONSE, error("ERROR", "23505")),
                ready(b'I'),
                (tag::PARSE_COMPLETE, vec![]),
                (tag::BIND_COMPLETE, vec![]),
                (tag::COMMAND_COMPLETE, b"INSERT 0 1\0".to_vec()),
                ready(b'I'),
            ],
        );
        let errors = steps.iter().filter(|s| matches!(s, Step::Error(_))).count();
        let answered = steps
            .iter()
            .filter(|s| matches!(s, Step::Ready(Answered::Client(_))))
            .count();
        assert_eq!((errors, answered), (1, 3));
        // Its Parse was answered before the error: the statement exists.
        assert!(state.take_forgotten().is_none());
        assert!(state.settled());
    }

    #[test]
    fn an_error_in_a_simple_query_does_not_skip_the_parses_behind_it() {
        let mut state = ProtocolState::default();
        state.query(Reset::Nothing, Vec::new());
        state.parse(false, name("s1"));
        state.sync();
        let steps = run(
            &mut state,
            &[
                (tag::ERROR_RESPONSE, error("ERROR", "42P01")),
                ready(b'I'),
                (tag::PARSE_COMPLETE, vec![]),
                ready(b'I'),
            ],
        );
        assert_eq!(steps[2], Step::Forward);
        assert!(state.take_forgotten().is_none());
    }

    #[test]
    fn copy_messages_pass_through_and_a_failed_copy_ends_its_query() {
        let mut state = ProtocolState::default();
        state.query(Reset::Names(vec!["x".into()]), Vec::new());
        let steps = run(
            &mut state,
            &[
                (tag::COPY_IN_RESPONSE, vec![0, 0, 0]),
                (tag::ERROR_RESPONSE, error("ERROR", "22P04")),
                ready(b'I'),
            ],
        );
        assert_eq!(steps[0], Step::Forward);
        let Step::Ready(Answered::Client(Some(extra))) = &steps[2] else {
            panic!("{steps:?}")
        };
        assert_eq!(extra.reset, Reset::Names(vec!["x".into()]));
        // COPY out from a query of the gateway's own would be swallowed whole.
        state.own(Own::Plain);
        assert_eq!(
            state.on_message(tag::COPY_OUT_RESPONSE, &[0, 0, 0]),
            Step::Swallow
        );
        assert_eq!(state.on_message(tag::COPY_DATA, b"x"), Step::Swallow);
    }

    #[test]
    fn parameter_changes_are_the_clients_unless_the_gateway_asked() {
        let mut state = ProtocolState::default();
        state.own(Own::Plain);
        state.own(Own::Restore);
        state.query(Reset::Nothing, Vec::new());
        let status = b"TimeZone\0UTC\0".to_vec();
        let steps = run(
            &mut state,
            &[
                (tag::PARAMETER_STATUS, status.clone()),
                ready(b'I'),
                (tag::PARAMETER_STATUS, status.clone()),
                ready(b'I'),
                (tag::PARAMETER_STATUS, status),
                (tag::NOTIFICATION_RESPONSE, vec![]),
            ],
        );
        assert_eq!(steps[0], Step::Swallow);
        assert_eq!(steps[2], Step::Forward);
        assert_eq!(steps[4], Step::Reported);
        assert_eq!(steps[5], Step::Forward);
        assert!(state.client_request_pending());
        assert!(!state.awaits(Own::Restore));
    }
}
