//! A transaction that runs on a replica until its first write, and the proof that it may move.
//!
//! While the transaction reads on a replica, the client's messages are kept as it sent them, and the answers
//! it received are digested, one digest per request (Query, Sync or FunctionCall: what ends in a
//! ReadyForQuery), hashing the bytes as they pass and never decoding a row. At the first write the session
//! opens a transaction on the primary, sends the kept messages there again, and digests what the primary
//! answers the same way. Equal digests mean the client read exactly what the primary shows now, so the
//! transaction may go on there: it is as if it had run on the primary from the start. Any difference, and
//! the write is refused with 40001 instead (see `Session::move_to_primary`).
//!
//! A pure type: its tests feed it bytes.

use crate::protocol::{self, tag};
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};

/// What a transaction on a replica keeps for its replay.
#[derive(Debug)]
pub struct Replay {
    /// The BEGIN the gateway answered itself and sent ahead of the transaction's first statement (None: the
    /// client's own first exchange began it, and is among `messages`).
    pub begin: Option<Bytes>,
    /// The client's messages since the transaction began, as it sent them.
    messages: BytesMut,
    /// Where each request begins in `messages`.
    requests: Vec<usize>,
    /// Messages since the last request's end (an extended exchange under way).
    open: bool,
    /// Digests of the answers the client received, one per answered request.
    answers: Vec<[u8; 16]>,
    framer: Framer,
    max_bytes: usize,
    /// Why the transaction can no longer move (it then cannot write).
    refused: Option<&'static str>,
    /// While replaying: answers compared so far, and the first that differed.
    compare: Option<Compare>,
}

#[derive(Debug)]
struct Compare {
    next: usize,
    differs: Option<usize>,
}

/// The replay answered differently (or not at all) for a request.
#[derive(Debug, PartialEq)]
pub struct Differs {
    /// The request, counted from the transaction's first.
    pub request: usize,
    /// Its statement, shortened, for the client's error and the log.
    pub statement: String,
}

impl std::fmt::Display for Differs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the primary now answers differently to `{}` (request {} of the transaction)",
            self.statement,
            self.request + 1
        )
    }
}

impl Replay {
    pub fn new(begin: Option<Bytes>, max_bytes: usize) -> Replay {
        Replay {
            begin,
            messages: BytesMut::new(),
            requests: Vec::new(),
            open: false,
            answers: Vec::new(),
            framer: Framer::default(),
            max_bytes,
            refused: None,
            compare: None,
        }
    }

    /// A client message forwarded to the replica.
    pub fn record(&mut self, message_tag: u8, message: &[u8]) {
        if self.refused.is_some() {
            return;
        }
        if let Some(why) = unreplayable(message_tag, message) {
            return self.refuse(why);
        }
        if self.messages.len() + message.len() > self.max_bytes {
            return self
                .refuse("it sent more than routing.transactions.max_replay_bytes before writing");
        }
        if !self.open {
            self.requests.push(self.messages.len());
            self.open = true;
        }
        self.messages.extend_from_slice(message);
        if matches!(message_tag, tag::QUERY | tag::SYNC | tag::FUNCTION_CALL) {
            self.open = false;
        }
    }

    /// The transaction can no longer move, for this reason.
    pub fn refuse(&mut self, why: &'static str) {
        self.refused = Some(why);
        self.messages = BytesMut::new();
        self.requests = Vec::new();
        self.answers = Vec::new();
    }

    pub fn refused(&self) -> Option<&'static str> {
        self.refused
    }

    /// Bytes the client received (or, while replaying, would have received) from the server.
    pub fn forwarded(&mut self, bytes: &[u8]) {
        let Replay {
            framer,
            answers,
            compare,
            ..
        } = self;
        framer.feed(bytes, &mut |digest| match compare {
            None => answers.push(digest),
            Some(compare) => {
                if compare.differs.is_none() && answers.get(compare.next) != Some(&digest) {
                    compare.differs = Some(compare.next);
                }
                compare.next += 1;
            }
        });
    }

    /// The requests to send again, in order, and the bytes of the client's requests answered so far; from
    /// now on, answers are compared rather than recorded.
    pub fn start_replay(&mut self) -> Bytes {
        self.compare = Some(Compare {
            next: 0,
            differs: None,
        });
        self.framer = Framer::default();
        Bytes::copy_from_slice(&self.messages)
    }

    /// Whether the recorded requests are being sent again.
    pub fn replaying(&self) -> bool {
        self.compare.is_some()
    }

    /// How many requests were recorded.
    pub fn requests(&self) -> usize {
        self.requests.len()
    }

    /// After the replay: whether every request was answered as before. `named` gives the text of a client's
    /// prepared statement that was not prepared inside the transaction.
    pub fn verdict(&self, named: impl Fn(&[u8]) -> Option<String>) -> Result<(), Differs> {
        let (next, differs) = self
            .compare
            .as_ref()
            .map_or((0, None), |c| (c.next, c.differs));
        let request = match differs {
            Some(request) => request,
            None if next == self.answers.len() => return Ok(()),
            None => next.min(self.answers.len()),
        };
        Err(Differs {
            request,
            statement: self.statement_of(request, named),
        })
    }

    /// The statement of a request: its Query's text, its Parse's, or the prepared statement its Bind names.
    fn statement_of(&self, request: usize, named: impl Fn(&[u8]) -> Option<String>) -> String {
        let Some(&start) = self.requests.get(request) else {
            return String::new();
        };
        let end = self
            .requests
            .get(request + 1)
            .copied()
            .unwrap_or(self.messages.len());
        let mut rest = &self.messages[start..end];
        while let Some(Ok((message_tag, len))) = protocol::peek_header(rest) {
            let Some(message) = rest.get(..len) else {
                break;
            };
            let body = protocol::body(message);
            let text = match message_tag {
                tag::QUERY => protocol::cstr(body).map(|(text, _)| text.to_vec()),
                tag::PARSE => protocol::cstr(body)
                    .and_then(|(_, rest)| protocol::cstr(rest))
                    .map(|(text, _)| text.to_vec()),
                tag::BIND => protocol::cstr(body)
                    .and_then(|(_, rest)| protocol::cstr(rest))
                    .map(|(name, _)| {
                        self.parsed_text(name, start)
                            .or_else(|| named(name))
                            .unwrap_or_else(|| {
                                format!("prepared statement \"{}\"", String::from_utf8_lossy(name))
                            })
                            .into_bytes()
                    }),
                _ => None,
            };
            if let Some(text) = text {
                let text = String::from_utf8_lossy(&text);
                let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
                return match text.char_indices().nth(120) {
                    Some((cut, _)) => format!("{}…", &text[..cut]),
                    None => text,
                };
            }
            rest = &rest[len..];
        }
        String::new()
    }
}

impl Replay {
    /// The text of the last statement parsed under `name` in the recorded messages before `before`.
    fn parsed_text(&self, name: &[u8], before: usize) -> Option<String> {
        let mut rest = &self.messages[..before];
        let mut found = None;
        while let Some(Ok((message_tag, len))) = protocol::peek_header(rest) {
            let message = rest.get(..len)?;
            if message_tag == tag::PARSE {
                if let Some((parsed, after)) = protocol::cstr(protocol::body(message)) {
                    if parsed == name {
                        found = protocol::cstr(after)
                            .map(|(text, _)| String::from_utf8_lossy(text).into_owned());
                    }
                }
            }
            rest = &rest[len..];
        }
        found
    }
}

/// What in a transaction cannot be sent again with the same result, or at all.
fn unreplayable(message_tag: u8, message: &[u8]) -> Option<&'static str> {
    let body = protocol::body(message);
    match message_tag {
        tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => Some("it ran COPY"),
        // Execute: portal name, then the most rows to return (0: all).
        tag::EXECUTE => {
            let (_, rest) = protocol::cstr(body)?;
            let max_rows = rest.get(..4)?;
            (max_rows != [0, 0, 0, 0]).then_some("it fetched a portal in parts")
        }
        tag::QUERY => protocol::cstr(body)
            .filter(|(text, _)| rolls_back_to_savepoint(text))
            .map(|_| "it rolled back to a savepoint"),
        tag::PARSE => protocol::cstr(body)
            .and_then(|(_, rest)| protocol::cstr(rest))
            .filter(|(text, _)| rolls_back_to_savepoint(text))
            .map(|_| "it rolled back to a savepoint"),
        _ => None,
    }
}

/// `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name` anywhere among the statements of a text: what it
/// undoes on the replica is invisible in the answers the client got.
fn rolls_back_to_savepoint(text: &[u8]) -> bool {
    crate::sql::split(text).any(|range| {
        let mut words = crate::lexer::tokens(&text[range]).map(|t| t.to_ascii_lowercase());
        if words.next().as_deref() != Some(b"rollback".as_slice()) {
            return false;
        }
        let mut next = words.next();
        if matches!(next.as_deref(), Some(b"work" | b"transaction")) {
            next = words.next();
        }
        next.as_deref() == Some(b"to".as_slice())
    })
}

/// Splits the bytes sent to the client into messages as they pass, and digests each request's answers:
/// every message up to and including its ReadyForQuery, except those a server may send differently for the
/// same data (ParameterStatus, NoticeResponse, NotificationResponse).
#[derive(Default)]
struct Framer {
    header: [u8; 5],
    have: usize,
    remaining: usize,
    hashed: bool,
    ready: bool,
    hasher: Sha256,
}

impl std::fmt::Debug for Framer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framer")
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl Framer {
    fn feed(&mut self, mut bytes: &[u8], done: &mut impl FnMut([u8; 16])) {
        while !bytes.is_empty() {
            if self.remaining == 0 {
                let take = (5 - self.have).min(bytes.len());
                self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                self.have += take;
                bytes = &bytes[take..];
                if self.have < 5 {
                    return;
                }
                self.have = 0;
                let message_tag = self.header[0];
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.hashed = !matches!(
                    message_tag,
                    tag::PARAMETER_STATUS | tag::NOTICE_RESPONSE | tag::NOTIFICATION_RESPONSE
                );
                self.ready = message_tag == tag::READY_FOR_QUERY;
                if self.hashed {
                    self.hasher.update(self.header);
                }
                self.remaining = len.saturating_sub(4);
            } else {
                let take = self.remaining.min(bytes.len());
                if self.hashed {
                    self.hasher.update(&bytes[..take]);
                }
                self.remaining -= take;
                bytes = &bytes[take..];
            }
            if self.remaining == 0 && self.have == 0 && std::mem::take(&mut self.ready) {
                let digest = std::mem::take(&mut self.hasher).finalize();
                let mut first = [0; 16];
                first.copy_from_slice(&digest[..16]);
                done(first);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TxStatus;

    fn query(text: &str) -> BytesMut {
        let mut out = BytesMut::new();
        protocol::query(&mut out, text);
        out
    }

    /// A server's answer to a one-row query: RowDescription-like bytes, a DataRow, CommandComplete, ReadyForQuery.
    fn answer(value: &str, notice: bool) -> BytesMut {
        let mut out = BytesMut::new();
        protocol::message(&mut out, tag::ROW_DESCRIPTION, |b| {
            b.extend_from_slice(b"\0\x01v\0")
        });
        if notice {
            protocol::message(&mut out, tag::NOTICE_RESPONSE, |b| {
                b.extend_from_slice(b"Mnotice\0\0")
            });
        }
        protocol::message(&mut out, tag::DATA_ROW, |b| {
            b.extend_from_slice(value.as_bytes())
        });
        protocol::command_complete(&mut out, "SELECT 1");
        protocol::ready_for_query(&mut out, TxStatus::InTransaction);
        out
    }

    fn recorded(values: &[&str]) -> Replay {
        let mut replay = Replay::new(None, 1 << 16);
        for (i, value) in values.iter().enumerate() {
            let q = query(&format!("SELECT v FROM t WHERE id = {i}"));
            replay.record(tag::QUERY, &q);
            replay.forwarded(&answer(value, false));
        }
        replay
    }

    #[test]
    fn the_same_answers_in_any_pieces_pass_and_a_changed_row_names_its_statement() {
        let mut replay = recorded(&["a", "b", "c"]);
        assert_eq!(replay.requests(), 3);
        let messages = replay.start_replay();
        assert_eq!(
            protocol::peek_header(&messages).unwrap().unwrap().0,
            tag::QUERY
        );
        // The same bytes, cut anywhere (here one byte at a time), with a notice added: equal.
        let mut all = BytesMut::new();
        for value in ["a", "b", "c"] {
            all.extend_from_slice(&answer(value, true));
        }
        for byte in all.chunks(1) {
            replay.forwarded(byte);
        }
        assert_eq!(replay.verdict(|_| None), Ok(()));

        let mut replay = recorded(&["a", "b", "c"]);
        replay.start_replay();
        for value in ["a", "B", "c"] {
            replay.forwarded(&answer(value, false));
        }
        assert_eq!(
            replay.verdict(|_| None),
            Err(Differs {
                request: 1,
                statement: "SELECT v FROM t WHERE id = 1".into()
            })
        );
    }

    #[test]
    fn a_replay_cut_short_differs_at_its_first_missing_answer() {
        let mut replay = recorded(&["a", "b"]);
        replay.start_replay();
        replay.forwarded(&answer("a", false));
        assert_eq!(replay.verdict(|_| None).unwrap_err().request, 1);
    }

    #[test]
    fn an_extended_exchange_is_one_request_and_is_named_by_its_parse() {
        let mut replay = Replay::new(None, 1 << 16);
        let mut exchange = BytesMut::new();
        protocol::message(&mut exchange, tag::PARSE, |b| {
            b.extend_from_slice(b"\0SELECT $1\0\0\0")
        });
        replay.record(tag::PARSE, &exchange);
        let mut bind = BytesMut::new();
        protocol::message(&mut bind, tag::BIND, |b| {
            b.extend_from_slice(b"\0\0\0\0\0\0\0\0")
        });
        replay.record(tag::BIND, &bind);
        let mut sync = BytesMut::new();
        protocol::sync(&mut sync);
        replay.record(tag::SYNC, &sync);
        replay.record(tag::QUERY, &query("SELECT 2"));
        assert_eq!(replay.requests(), 2);
        assert_eq!(replay.statement_of(0, |_| None), "SELECT $1");
        assert_eq!(replay.statement_of(1, |_| None), "SELECT 2");
        // A Bind is named by the text its statement was parsed with, in the transaction or before it.
        let mut named = Replay::new(None, 1 << 16);
        let mut parse = BytesMut::new();
        protocol::message(&mut parse, tag::PARSE, |b| {
            b.extend_from_slice(b"s1\0SELECT 3\0\0\0")
        });
        named.record(tag::PARSE, &parse);
        named.record(tag::SYNC, &sync);
        for statement in [&b"s1"[..], b"s0"] {
            let mut bind = BytesMut::new();
            protocol::message(&mut bind, tag::BIND, |b| {
                b.extend_from_slice(b"\0");
                protocol::put_cstr(b, statement);
                b.extend_from_slice(b"\0\0\0\0\0\0");
            });
            named.record(tag::BIND, &bind);
            named.record(tag::SYNC, &sync);
        }
        assert_eq!(named.statement_of(1, |_| None), "SELECT 3");
        assert_eq!(
            named.statement_of(2, |_| Some("SELECT 0".into())),
            "SELECT 0"
        );
        assert_eq!(named.statement_of(2, |_| None), "prepared statement \"s0\"");
    }

    #[test]
    fn what_cannot_be_replayed_refuses_the_move_and_frees_the_record() {
        for (text, why) in [
            ("ROLLBACK TO SAVEPOINT a", "savepoint"),
            ("select 1; rollback work to a", "savepoint"),
        ] {
            let mut replay = recorded(&["a"]);
            replay.record(tag::QUERY, &query(text));
            assert!(replay.refused().unwrap().contains(why), "{text}");
            assert_eq!(replay.requests(), 0);
        }
        let mut replay = recorded(&["a"]);
        replay.record(tag::QUERY, &query("ROLLBACK"));
        replay.record(tag::QUERY, &query("RELEASE SAVEPOINT a"));
        assert_eq!(replay.refused(), None);
        let mut execute = BytesMut::new();
        protocol::message(&mut execute, tag::EXECUTE, |b| {
            b.extend_from_slice(b"\0\0\0\0\x0a")
        });
        replay.record(tag::EXECUTE, &execute);
        assert!(replay.refused().unwrap().contains("in parts"));

        let mut small = Replay::new(None, 40);
        small.record(tag::QUERY, &query("SELECT 1"));
        assert_eq!(small.refused(), None);
        small.record(
            tag::QUERY,
            &query("SELECT a_rather_long_column_name FROM t"),
        );
        assert!(small.refused().unwrap().contains("max_replay_bytes"));
    }
}
