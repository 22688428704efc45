//! The session's side of insert batching ([`crate::batch`]): which exchanges of an idle client are handed to
//! the batcher instead of a server connection, and the answers the client gets for them.
//!
//! An exchange is batched when the client is idle (no transaction, not pinned), the whole exchange is in the
//! buffer, and it is exactly one batchable INSERT: a Query, or [Parse] Bind [Describe portal] Execute Sync on
//! the unnamed portal. Consecutive batchable exchanges a client pipelined are queued together, then answered in
//! order. Anything else takes the ordinary path, and so does a row with nothing to batch with
//! ([`batch::alone`]): the session keeps its [`batch::Alone`] until the exchange is over.

use super::duplex::client_gone;
use super::{End, Session};
use crate::batch::{self, CopyForm, Insert, Key, Outcome, Row, Values};
use crate::metrics::METRICS;
use crate::protocol::{self, tag, PgError, TxStatus};
use crate::settings::Settings;
use bytes::{Buf, Bytes, BytesMut};
use std::sync::Arc;

/// At most this many pipelined exchanges of one client are queued before their answers are awaited.
const MAX_PIPELINED: usize = 256;

/// A batched exchange: its row (until submitted) and what the client's answer consists of.
pub(super) struct Waiting {
    queue: Arc<batch::Queue>,
    row: Option<Row>,
    /// The client sent a Parse, a Describe (of the portal); a Query when neither is extended.
    parse: bool,
    describe: bool,
    extended: bool,
}

/// The session's part in insert batching, made at its first look at a statement for it.
#[derive(Default)]
pub(super) struct Batching {
    /// Exchanges taken for insert batching, not yet answered.
    waiting: Vec<Waiting>,
    /// What batch keys of this session carry.
    identity: Option<Identity>,
    /// The row of this session running alone on its own connection, until its exchange is over.
    alone: Option<batch::Alone>,
    /// The queue of the session's last batch key: a client inserting into one table reuses it without a
    /// lookup in the batcher's map.
    queue: Option<Arc<batch::Queue>>,
    /// The session's last batchable Query: the next one that begins the same is read from its row on.
    last: Option<Arc<Insert>>,
}

impl Batching {
    pub(super) fn is_idle(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// What batch keys of one session carry, made once per change of its settings (the first): database, user,
/// and the settings without what does not matter to a batch.
pub(super) type Identity = (Settings, Arc<str>, Arc<str>, batch::SettingsKey);

/// The messages of one extended-protocol exchange at the front of the buffer.
struct Exchange<'a> {
    parse: Option<(&'a [u8], &'a [u8])>,
    /// The Bind body after the portal and statement names.
    bind_rest: &'a [u8],
    statement_name: &'a [u8],
    describe: bool,
    len: usize,
}

impl Session {
    /// Takes the batchable exchanges at the front of the client's buffer. True when it took any.
    pub(super) fn take_batchable(&mut self) -> Result<bool, PgError> {
        if !self.state.status().is_idle()
            || self.pinned.is_some()
            || self.reads.deferred_begin.is_some()
        {
            return Ok(false);
        }
        self.follow_reload();
        // Without a primary the insert is not queued: it is answered at once with why (57P03).
        if self.config.batching.tables.is_empty() || self.regions.picture().writer.url().is_none() {
            return Ok(false);
        }
        let config = self.shared.config.load_full();
        let tables = &config.batching.tables;
        if tables.is_empty() {
            return Ok(false);
        }
        let mut batch = self.batch.take().unwrap_or_default();
        // The exchange a row ran alone in is over once the session is back here.
        batch.alone = None;
        let taken = loop {
            if batch.waiting.len() >= MAX_PIPELINED {
                break Ok(true);
            }
            let waiting = match protocol::peek_header(&self.io.from_client) {
                Some(Ok((tag::QUERY, len))) if self.io.from_client.len() >= len => {
                    self.take_query(&mut batch, len, tables)
                }
                Some(Ok((tag::PARSE | tag::BIND, _))) => {
                    match self.take_extended(&mut batch, tables) {
                        Ok(waiting) => waiting,
                        Err(error) => break Err(error),
                    }
                }
                _ => None,
            };
            match waiting {
                Some(waiting) => batch.waiting.push(waiting),
                None => break Ok(!batch.waiting.is_empty()),
            }
        };
        self.batch = Some(batch);
        taken
    }

    /// The exchange of a row that ran alone is over (answered, failed or lost): rows of its kind need not wait
    /// for it any more.
    #[inline]
    pub(super) fn alone_over(&mut self) {
        if let Some(batch) = &mut self.batch {
            batch.alone = None;
        }
    }

    /// Whether the first row of a take runs alone (see [`batch::alone`]); the session then keeps the claim.
    fn runs_alone(&self, batch: &mut Batching, queue: &Arc<batch::Queue>) -> bool {
        if !batch.waiting.is_empty() {
            return false;
        }
        batch.alone = batch::alone(&self.shared, queue);
        batch.alone.is_some()
    }

    fn take_query(
        &mut self,
        batch: &mut Batching,
        len: usize,
        tables: &[String],
    ) -> Option<Waiting> {
        let text = protocol::query_text(protocol::body(&self.io.from_client[..len]))?;
        let insert = Arc::new(batch::analyze_like(text, tables, batch.last.as_deref())?);
        batch.last = Some(insert.clone());
        let copy = Key::copy_form(&insert, None, &[]);
        let queue = self.batch_queue(batch, &insert, None, copy);
        if self.runs_alone(batch, &queue) {
            return None;
        }
        let message = self.io.from_client.split_to(len).freeze();
        Some(Waiting {
            queue,
            row: Some(Row {
                insert,
                values: Values::Literal,
                alone: message,
                drop_parse_complete: false,
            }),
            parse: false,
            describe: false,
            extended: false,
        })
    }

    fn take_extended(
        &mut self,
        batch: &mut Batching,
        tables: &[String],
    ) -> Result<Option<Waiting>, PgError> {
        let buf = &self.io.from_client[..];
        let Some(exchange) = extended_exchange(buf) else {
            return Ok(None);
        };
        // The statement: the one parsed in this exchange (remembered only if the row is taken), or one the
        // client prepared earlier.
        let prepared;
        let (insert, parse_rest, parsed) = match exchange.parse {
            Some((name, rest)) => {
                let text = protocol::cstr(rest).map(|(t, _)| t).unwrap_or_default();
                if name != exchange.statement_name {
                    return Ok(None);
                }
                let Some(insert) = batch::analyze(text, tables) else {
                    return Ok(None);
                };
                (Arc::new(insert), rest, Some(name))
            }
            None => match self.statements.get(exchange.statement_name) {
                Some(statement) => match &statement.batch {
                    Some(insert) if batch::enabled(&insert.table, tables) => {
                        prepared = statement.parse_rest.clone();
                        (insert.clone(), &prepared[..], None)
                    }
                    _ => return Ok(None),
                },
                None => return Ok(None),
            },
        };
        let Some((declared, formats, values)) = bound_values(parse_rest, exchange.bind_rest) else {
            return Ok(None);
        };
        if formats.len() != insert.params {
            return Ok(None); // the server will say what is wrong with it
        }
        let mut types = declared;
        types.resize(insert.params, 0);
        let copy = Key::copy_form(&insert, Some(&types), &formats);
        let queue = self.batch_queue(batch, &insert, Some(types), copy);
        if self.runs_alone(batch, &queue) {
            return Ok(None);
        }
        // Taken: what the row needs is copied out of the client's buffer.
        let alone = alone_messages(parse_rest, exchange.bind_rest, exchange.describe);
        let values = Values::Bound {
            formats,
            values: Bytes::copy_from_slice(values),
        };
        let parsed = parsed.map(|name| {
            (
                Bytes::copy_from_slice(name),
                Bytes::copy_from_slice(parse_rest),
            )
        });
        let (len, describe) = (exchange.len, exchange.describe);
        self.io.from_client.advance(len);
        let parse = parsed.is_some();
        if let Some((name, rest)) = parsed {
            // The gateway answers this Parse; the session remembers the statement as on_parse would.
            let statement = self.new_statement(&name, rest);
            self.statements.insert(name, statement)?;
        }
        Ok(Some(Waiting {
            queue,
            row: Some(Row {
                insert,
                values,
                alone,
                drop_parse_complete: !parse,
            }),
            parse,
            describe,
            extended: true,
        }))
    }

    /// The batch key for a row of this session. application_name is left out of it: it does not change what a
    /// row means, and leaving it in would keep apart clients that differ only in their name.
    fn batch_key(
        &self,
        batch: &mut Batching,
        insert: &Insert,
        types: Option<Vec<u32>>,
        copy: CopyForm,
    ) -> Key {
        let identity = match &batch.identity {
            Some(identity) if Arc::ptr_eq(&identity.0, &self.settings.current) => identity,
            _ => {
                let mut settings = (*self.settings.current).clone();
                settings.values.remove("application_name");
                batch.identity.insert((
                    self.settings.current.clone(),
                    self.pool.key.database.as_str().into(),
                    self.pool.key.user.as_str().into(),
                    batch::SettingsKey::new(Arc::new(settings)),
                ))
            }
        };
        Key {
            database: identity.1.clone(),
            user: identity.2.clone(),
            settings: identity.3.clone(),
            table: insert.table.clone(),
            columns: insert.columns.clone(),
            types,
            copy,
        }
    }

    /// The queue of a row of this session.
    fn batch_queue(
        &self,
        batch: &mut Batching,
        insert: &Insert,
        types: Option<Vec<u32>>,
        copy: CopyForm,
    ) -> Arc<batch::Queue> {
        let key = self.batch_key(batch, insert, types, copy);
        match &batch.queue {
            Some(queue) if *queue.key() == key => queue.clone(),
            _ => batch.queue.insert(self.shared.batcher.queue(key)).clone(),
        }
    }

    /// Queues the batched exchanges and answers each once its row's batch has committed (or its error),
    /// in the order the client sent them. A client that leaves meanwhile withdraws its rows not yet in a batch.
    pub(super) async fn run_batched(&mut self) -> Result<(), End> {
        let mut waiting = match self.batch.as_mut() {
            Some(batch) => std::mem::take(&mut batch.waiting),
            None => return Ok(()),
        };
        let mut tickets = Vec::with_capacity(waiting.len());
        for entry in waiting.iter_mut() {
            let row = entry.row.take().expect("each row is submitted once");
            let submit = batch::submit(&self.shared, entry.queue.clone(), row);
            tokio::select! {
                ticket = submit => tickets.push(ticket),
                _ = client_gone(&mut self.io.client, &mut self.io.from_client) => return Err(End::Client),
            }
        }
        for (entry, ticket) in waiting.iter().zip(tickets) {
            let outcome = tokio::select! {
                outcome = ticket => outcome.unwrap_or_else(|_| Outcome::Failed(PgError::error(
                    "XX000",
                    "regiongate: the batch of this row was abandoned",
                ))),
                _ = client_gone(&mut self.io.client, &mut self.io.from_client) => return Err(End::Client),
            };
            let out = &mut self.io.to_client;
            match outcome {
                Outcome::Committed(lsn) => {
                    if let Some(lsn) = lsn {
                        self.reads.wrote_at(lsn);
                    }
                    if entry.parse {
                        protocol::parse_complete(out);
                    }
                    if entry.extended {
                        protocol::bind_complete(out);
                    }
                    if entry.describe {
                        protocol::no_data(out);
                    }
                    protocol::command_complete(out, "INSERT 0 1");
                    protocol::ready_for_query(out, TxStatus::Idle);
                }
                Outcome::Answered(answers, lsn) => {
                    if let Some(lsn) = lsn {
                        self.reads.wrote_at(lsn);
                    }
                    out.extend_from_slice(&answers);
                }
                Outcome::Failed(error) => {
                    METRICS.error_sent(&error.code);
                    error.encode(out);
                    protocol::ready_for_query(out, TxStatus::Idle);
                }
            }
        }
        Ok(())
    }
}

/// For the fuzz target: reads `data` as a batchable exchange and its Bind values, as `take_extended` does.
pub(super) fn fuzz(data: &[u8]) {
    if let Some(exchange) = extended_exchange(data) {
        let parse_rest = exchange.parse.map_or(&b"x\0\0\0"[..], |(_, rest)| rest);
        if let Some((_, formats, values)) = bound_values(parse_rest, exchange.bind_rest) {
            let _ = (formats.len(), values.len());
        }
    }
}

/// [Parse] Bind [Describe portal] Execute Sync at the front of `buf`, all complete, on the unnamed portal.
fn extended_exchange(buf: &[u8]) -> Option<Exchange<'_>> {
    let mut at = 0;
    let mut next = |expect: &[u8]| -> Option<(u8, &[u8])> {
        let (tag, len) = protocol::peek_header(&buf[at..])?.ok()?;
        if !expect.contains(&tag) || buf.len() < at + len {
            return None;
        }
        let message = &buf[at..at + len];
        at += len;
        Some((tag, protocol::body(message)))
    };
    let (mut message_tag, mut body) = next(&[tag::PARSE, tag::BIND])?;
    let mut parse = None;
    if message_tag == tag::PARSE {
        parse = Some(protocol::cstr(body)?);
        (message_tag, body) = next(&[tag::BIND])?;
    }
    debug_assert_eq!(message_tag, tag::BIND);
    let (portal, rest) = protocol::cstr(body)?;
    let (statement_name, bind_rest) = protocol::cstr(rest)?;
    if !portal.is_empty() {
        return None;
    }
    let (mut message_tag, mut body) = next(&[tag::DESCRIBE, tag::EXECUTE])?;
    let mut describe = false;
    if message_tag == tag::DESCRIBE {
        if body != b"P\0" {
            return None;
        }
        describe = true;
        (message_tag, body) = next(&[tag::EXECUTE])?;
    }
    debug_assert_eq!(message_tag, tag::EXECUTE);
    if protocol::cstr(body)?.0 != b"" {
        return None;
    }
    next(&[tag::SYNC])?;
    Some(Exchange {
        parse,
        bind_rest,
        statement_name,
        describe,
        len: at,
    })
}

/// From a statement's Parse rest (text, types) and a Bind's rest (formats, values, result formats): the
/// declared parameter types, one format code per parameter, and the raw values section. None when the Bind
/// is malformed (the server will say so).
fn bound_values<'a>(
    parse_rest: &[u8],
    bind_rest: &'a [u8],
) -> Option<(Vec<u32>, Vec<i16>, &'a [u8])> {
    let (_, types) = protocol::cstr(parse_rest)?;
    let declared_count = i16::from_be_bytes(types.get(..2)?.try_into().ok()?).max(0) as usize;
    let declared = types
        .get(2..2 + 4 * declared_count)?
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut at = 0;
    let i16_at = |at: &mut usize| -> Option<i16> {
        let v = i16::from_be_bytes(bind_rest.get(*at..*at + 2)?.try_into().ok()?);
        *at += 2;
        Some(v)
    };
    let format_count = i16_at(&mut at)?.max(0) as usize;
    let mut codes = Vec::with_capacity(format_count);
    for _ in 0..format_count {
        codes.push(i16_at(&mut at)?);
    }
    let count = i16_at(&mut at)?.max(0) as usize;
    let formats = match codes.len() {
        0 => vec![0; count],
        1 => vec![codes[0]; count],
        n if n == count => codes,
        _ => return None,
    };
    let start = at;
    for _ in 0..count {
        let len = i32::from_be_bytes(bind_rest.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len > 0 {
            at = at.checked_add(len as usize)?;
        } else if len < -1 {
            return None;
        }
    }
    let values = bind_rest.get(start..at)?;
    Some((declared, formats, values))
}

/// The row's exchange as the client sent it, on the unnamed statement and portal, to run it alone.
fn alone_messages(parse_rest: &[u8], bind_rest: &[u8], describe: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(parse_rest.len() + bind_rest.len() + 40);
    protocol::parse_renamed(&mut out, b"", parse_rest);
    protocol::renamed(&mut out, tag::BIND, b"\0", b"", bind_rest);
    if describe {
        protocol::describe_portal(&mut out, b"");
    }
    protocol::execute(&mut out, b"", 0);
    protocol::sync(&mut out);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_values_are_found_with_their_formats() {
        // text "INSERT ..", two declared types (int4, 0)
        let parse_rest = b"x\0\0\x02\0\0\0\x17\0\0\0\0";
        // one format code (binary) for all, two values: 4 bytes and NULL, no result formats
        let bind_rest = b"\0\x01\0\x01\0\x02\0\0\0\x04\0\0\0\x07\xff\xff\xff\xff\0\0";
        let (types, formats, values) = bound_values(parse_rest, bind_rest).unwrap();
        assert_eq!(types, vec![23, 0]);
        assert_eq!(formats, vec![1, 1]);
        assert_eq!(values, b"\0\0\0\x04\0\0\0\x07\xff\xff\xff\xff");
        assert!(bound_values(parse_rest, b"\0\0\0\x01\0\0\0\x09ab").is_none());
    }

    #[test]
    fn only_whole_exchanges_on_the_unnamed_portal_are_taken() {
        let mut buf = BytesMut::new();
        protocol::parse_renamed(&mut buf, b"", b"INSERT INTO t VALUES ($1)\0\0\0");
        protocol::renamed(&mut buf, b'B', b"\0", b"", b"\0\0\0\x01\0\0\0\x011\0\0");
        buf.extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0");
        let without_sync = buf.clone();
        buf.extend_from_slice(b"S\0\0\0\x04");
        let exchange = extended_exchange(&buf).unwrap();
        assert_eq!(exchange.len, buf.len());
        assert!(exchange.parse.is_some() && !exchange.describe);
        assert!(extended_exchange(&without_sync).is_none());
        let mut named_portal = BytesMut::new();
        protocol::renamed(&mut named_portal, b'B', b"p\0", b"", b"\0\0\0\0\0\0");
        named_portal.extend_from_slice(b"E\0\0\0\x0ap\0\0\0\0\0S\0\0\0\x04");
        assert!(extended_exchange(&named_portal).is_none());
    }
}
