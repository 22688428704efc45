//! The server's answers on their way to the client. Most messages are relayed in runs without a look at their
//! bodies; the few that matter go through the protocol state ([`super::state`]), which says whose they are,
//! and the session acts on what it says: a capture's rows, a WAL position, an error to put in the client's
//! words, a FATAL that ends the connection.

use super::state::{Answered, ErrorFor, Own, Step};
use super::statements::{self, unshift};
use super::{End, Session};
use crate::drain::{Outcome, Phase};
use crate::metrics::METRICS;
use crate::protocol::{self, tag, PgError};
use bytes::{Buf, Bytes, BytesMut};

/// What to do with one server message.
enum Action {
    Forward,
    Drop,
    Replace(Bytes),
}

impl Session {
    /// Relays complete server messages from the connection's read buffer, acting on the few that matter.
    pub(super) fn process_server(&mut self) -> Result<(), End> {
        let mut buf = std::mem::take(self.conn().read_buf());
        let client_mark = self.io.to_client.len();
        let mut run_start = 0;
        let mut i = 0;
        let mut lost = None;
        loop {
            if self.io.server_skip > 0 {
                let n = self.io.server_skip.min(buf.len() - i);
                i += n;
                self.io.server_skip -= n;
                if self.io.server_skip > 0 {
                    break;
                }
                continue;
            }
            let (message_tag, len) = match protocol::peek_header(&buf[i..]) {
                None => break,
                Some(Ok(header)) => header,
                Some(Err(bad)) => {
                    lost = Some(format!("invalid message length {} from the server", bad.0));
                    break;
                }
            };
            if !self.state.swallowing() && is_passthrough(message_tag) {
                self.observer.rows += u64::from(message_tag == tag::DATA_ROW);
                let available = buf.len() - i;
                if available < len {
                    self.io.server_skip = len - available;
                    i = buf.len();
                    break;
                }
                i += len;
                continue;
            }
            if buf.len() - i < len {
                buf.reserve(len - (buf.len() - i));
                break;
            }
            match self.on_server_message(message_tag, &buf[i..i + len]) {
                Action::Forward => i += len,
                Action::Drop => {
                    self.io.to_client.extend_from_slice(&buf[run_start..i]);
                    i += len;
                    run_start = i;
                }
                Action::Replace(replacement) => {
                    self.io.to_client.extend_from_slice(&buf[run_start..i]);
                    self.io.to_client.extend_from_slice(&replacement);
                    i += len;
                    run_start = i;
                }
            }
            if std::mem::take(&mut self.server_fatal) {
                // Do not wait for the close: a request sent meanwhile would be lost with the connection.
                if !self.shutdown.cut {
                    lost = Some("the server ended the connection".to_string());
                }
                break;
            }
        }
        if run_start == 0 && i == buf.len() && self.io.to_client.is_empty() {
            // All of it goes to the client, who is owed nothing else: the buffer itself goes (its bytes are
            // not copied), and the connection reads into the client's empty one.
            std::mem::swap(&mut self.io.to_client, &mut buf);
        } else {
            self.io.to_client.extend_from_slice(&buf[run_start..i]);
            // Emptied where it starts when all was read, so that it keeps its capacity for the next answer.
            if i == buf.len() {
                buf.clear();
            } else {
                buf.advance(i);
            }
        }
        *self.conn().read_buf() = buf;
        if let Some(replay) = self.state.replay() {
            // A transaction that may move digests what its client gets; a replay's answers are digested and
            // go no further (the client had them from the replica).
            replay.forwarded(&self.io.to_client[client_mark..]);
            if replay.replaying() {
                self.io.to_client.truncate(client_mark);
            }
        }
        if self.reads.retry_input.is_some() && answers_forwarded(&self.io.to_client[client_mark..])
        {
            self.answered();
        }
        if self.settings.is_lost() {
            return Err(End::Fatal(Box::new(PgError::fatal(
                "08006",
                "regiongate: could not read this session's settings back from its server connection; \
                 the session cannot go on without them",
            ))));
        }
        match lost {
            Some(reason) => self.server_lost(&reason),
            None if self.shutdown.cut => Err(End::Drained(Outcome::Cut)),
            None => Ok(()),
        }
    }

    fn on_server_message(&mut self, message_tag: u8, message: &[u8]) -> Action {
        let body = protocol::body(message);
        let step = self.state.on_message(message_tag, body);
        if let Some(forgotten) = self.state.take_forgotten() {
            let names: Vec<_> = forgotten.collect();
            if let Some(lease) = self.lease.as_mut() {
                for name in names {
                    lease.conn().forget_statement(&name);
                }
            }
        }
        match step {
            Step::Forward => Action::Forward,
            Step::Swallow => Action::Drop,
            Step::Reported => {
                self.settings.touch();
                Action::Forward
            }
            Step::OwnRow(Own::Position) => {
                if let Some(lsn) = crate::server::wal_position(body) {
                    self.reads.wrote_at(lsn);
                }
                Action::Drop
            }
            Step::OwnRow(_) => {
                self.settings.capture_row(protocol::data_row_text(body));
                Action::Drop
            }
            Step::Ready(Answered::Own { own, failed }) => {
                if own == Own::Capture {
                    if failed {
                        self.settings.capture_failed();
                    } else {
                        let conn = self
                            .lease
                            .as_mut()
                            .expect("a capture runs on a server")
                            .conn();
                        self.settings.captured(conn);
                        self.session_budget_changed();
                    }
                }
                Action::Drop
            }
            Step::Ready(answered) => {
                if let Answered::Client(Some(extra)) = answered {
                    self.restore_reset_values(&extra.reset);
                }
                if self.state.status().is_idle() {
                    // The transaction ended: what is recorded from here on would belong to the next one.
                    self.close_transaction();
                }
                let replica = matches!(self.route, Some(super::Route::Replica(_)));
                let server = self.lease.as_mut().map(|l| l.conn().addr());
                let more = self.state.client_request_pending();
                self.observer
                    .answered(replica, server, more, &self.handle.entry);
                Action::Forward
            }
            Step::Error(error) => self.on_server_error(error, body),
        }
    }

    /// After a client's request with a RESET: a pooled connection went back to the server's defaults, the
    /// client's session must be at its connection-time values (the restore checks on the server what is reset
    /// now). Only with nothing pipelined behind the request, which the restore would overtake; otherwise the
    /// next capture and replay correct it.
    fn restore_reset_values(&mut self, reset: &super::settings::Reset) {
        if !self.state.quiet() {
            return;
        }
        if let Some(sql) = self.settings.restore_sql(reset) {
            self.send_own_query(&sql, Own::Restore);
        }
    }

    fn on_server_error(&mut self, error: ErrorFor, body: &[u8]) -> Action {
        METRICS.server_error(body);
        let ErrorFor { own, fatal } = error;
        if fatal {
            self.conn().discard();
            self.server_fatal = true;
        }
        match own {
            // The client's transaction failed after its RESET: rolled back with it, nothing to restore.
            Some(Own::Restore | Own::Abort) if !fatal => return Action::Drop,
            // Asked again (see the capture's ReadyForQuery).
            Some(Own::Capture) if !fatal => return Action::Drop,
            // The client was told its transaction began, and its statements are on their way behind the
            // BEGIN: run outside a transaction, a write among them would commit on its own. The gateway only
            // defers a BEGIN it read whole and sends it where its modes are allowed, so this is not expected;
            // if it happens, the session ends with the server's reason and the connection is closed.
            Some(Own::Begin) => {
                let (code, text) = protocol::error_fields(body);
                event!(self, error, code, reason = %text, "the BEGIN of a client's transaction failed on its server; closing the session");
                self.conn().discard();
                self.server_fatal = true;
                self.fatal_forwarded = true;
                let mut out = BytesMut::new();
                PgError {
                    code: code.into(),
                    ..PgError::fatal(
                        "08006",
                        format!(
                            "regiongate: the transaction could not begin on its server: {text}"
                        ),
                    )
                }
                .encode(&mut out);
                return Action::Replace(out.freeze());
            }
            Some(_) => {
                let (code, text) = protocol::error_fields(body);
                event!(self, warn, code, reason = %text, "a statement the gateway sent for the client failed");
                // Our picture of this connection is wrong; do not hand it to anyone else.
                self.conn().discard();
                return Action::Drop;
            }
            None => {}
        }
        let session_ends = !self.state.status().is_idle() || self.pinned.is_some();
        if fatal && session_ends {
            // The session ends with its backend, as on a direct connection: the client gets the server's own
            // FATAL (57P01 for pg_terminate_backend), and nothing after it.
            self.fatal_forwarded = true;
        }
        if fatal && !session_ends {
            // The server connection is going away, but the client's session is not: tell it as an ERROR.
            let (code, text) = protocol::error_fields(body);
            let mut out = BytesMut::new();
            PgError {
                code: code.into(),
                ..PgError::error("08006", text)
            }
            .encode(&mut out);
            return Action::Replace(out.freeze());
        }
        if self.observer.timed_out && protocol::error_fields(body).0 == "57014" {
            // The cancel was the gateway's: say why, as PostgreSQL's own statement_timeout would.
            let mut out = BytesMut::new();
            PgError::error(
                "57014",
                format!(
                    "canceling statement due to statement timeout (regiongate limits.statement_timeout is {})",
                    humantime::format_duration(self.observer.statement_timeout())
                ),
            )
            .encode(&mut out);
            return Action::Replace(out.freeze());
        }
        if self.shared.drain.phase() == Phase::Cutting && protocol::error_fields(body).0 == "57014"
        {
            // The drain's cancel of a request past the shutdown timeout: the client is told what a terminated
            // backend says instead (when the session ends), and the connection is closed, which rolls the
            // transaction back.
            self.conn().discard();
            self.server_fatal = true;
            self.shutdown.cut = true;
            return Action::Drop;
        }
        if statements::duplicate_server_statement(body) {
            // The gateway's picture of the connection's statements is wrong (a Close the server skipped
            // after an error): it cannot prepare that statement there again, so nobody gets it.
            self.conn().discard();
        }
        if statements::stale_statement(body) {
            event!(
                self,
                info,
                "a prepared statement's result type changed: statements are prepared anew"
            );
            self.shared.statement_names.forget_all();
        }
        let shifts = self.state.front_shifts();
        if memchr::memmem::find(body, b"__rg_").is_some() || shifts.is_some() {
            // Say it in the client's words: its statement names, and positions in the text it sent.
            let shifts = shifts.unwrap_or_default();
            let replaced = protocol::map_error(
                body,
                |text| self.statements.client_names(text),
                |position| unshift(position, shifts),
            );
            return Action::Replace(replaced.freeze());
        }
        Action::Forward
    }
}

/// Server messages relayed without a look at their bodies (and streamed through when large), unless they
/// answer one of the gateway's own requests. CommandComplete is among them: the protocol state has nothing to
/// learn from it, and it comes with every statement.
/// True when `forwarded` (whole messages, the last one maybe in part) holds more than messages a server may
/// send at any time. A replica told to shut down sends a WARNING before it closes: the client may have it, and
/// still get its answer from another server.
fn answers_forwarded(forwarded: &[u8]) -> bool {
    let mut rest = forwarded;
    while let Some(&message_tag) = rest.first() {
        if !matches!(
            message_tag,
            tag::NOTICE_RESPONSE | tag::PARAMETER_STATUS | tag::NOTIFICATION_RESPONSE
        ) {
            return true;
        }
        match protocol::peek_header(rest) {
            Some(Ok((_, len))) if len <= rest.len() => rest = &rest[len..],
            _ => return false,
        }
    }
    false
}

fn is_passthrough(message_tag: u8) -> bool {
    matches!(
        message_tag,
        tag::DATA_ROW
            | tag::COMMAND_COMPLETE
            | tag::ROW_DESCRIPTION
            | tag::PARAMETER_DESCRIPTION
            | tag::NO_DATA
            | tag::BIND_COMPLETE
            | tag::CLOSE_COMPLETE
            | tag::PORTAL_SUSPENDED
            | tag::EMPTY_QUERY_RESPONSE
            | tag::COPY_DATA
            | tag::COPY_DONE
            | tag::COPY_IN_RESPONSE
            | tag::COPY_OUT_RESPONSE
            | tag::COPY_BOTH_RESPONSE
            | tag::FUNCTION_CALL_RESPONSE
            | tag::NOTICE_RESPONSE
            | tag::NOTIFICATION_RESPONSE
    )
}
