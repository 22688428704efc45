//! The session's side of insert batching ([`crate::batch`]): which exchanges of an idle client are handed to
//! the batcher instead of a server connection, and the answers the client gets for them.
//!
//! An exchange is batched when the client is idle (no transaction, not pinned), the whole exchange is in the
//! buffer, and it is exactly one batchable INSERT: a Query, or [Parse] Bind [Describe portal] Execute Sync on
//! the unnamed portal. Consecutive batchable exchanges a client pipelined are queued together, then answered in
//! order. Anything else takes the ordinary path.

use super::*;
use crate::batch::{self, CopyForm, Insert, Key, Outcome, Row, Values};

/// At most this many pipelined exchanges of one client are queued before their answers are awaited.
const MAX_PIPELINED: usize = 256;

/// A batched exchange: its row (until submitted) and what the client's answer consists of.
pub(super) struct Waiting {
    key: Key,
    row: Option<Row>,
    /// The client sent a Parse, a Describe (of the portal); a Query when neither is extended.
    parse: bool,
    describe: bool,
    extended: bool,
}

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
        if self.status != b'I' || self.pinned.is_some() || self.reads.deferred_begin.is_some() {
            return Ok(false);
        }
        self.follow_reload();
        if !self.batching {
            return Ok(false);
        }
        let config = self.shared.config.load_full();
        let tables = &config.batching.tables;
        if tables.is_empty() {
            return Ok(false);
        }
        while self.batched.len() < MAX_PIPELINED {
            let waiting = match protocol::peek_header(&self.from_client) {
                Some(Ok((b'Q', len))) if self.from_client.len() >= len => {
                    self.take_query(len, tables)
                }
                Some(Ok((b'P' | b'B', _))) => self.take_extended(tables)?,
                _ => None,
            };
            match waiting {
                Some(waiting) => self.batched.push(waiting),
                None => break,
            }
        }
        Ok(!self.batched.is_empty())
    }

    fn take_query(&mut self, len: usize, tables: &[String]) -> Option<Waiting> {
        let text = protocol::query_text(protocol::body(&self.from_client[..len]))?;
        let insert = batch::analyze(text, tables)?;
        let message = self.from_client.split_to(len).freeze();
        let copy = Key::copy_form(&insert, None, &[]);
        Some(Waiting {
            key: self.batch_key(&insert, None, copy),
            row: Some(Row {
                insert: Arc::new(insert),
                values: Values::Literal,
                alone: message,
                drop_parse_complete: false,
            }),
            parse: false,
            describe: false,
            extended: false,
        })
    }

    fn take_extended(&mut self, tables: &[String]) -> Result<Option<Waiting>, PgError> {
        let Some(len) = extended_exchange(&self.from_client).map(|e| e.len) else {
            return Ok(None);
        };
        // A copy of just this exchange, so that the session can be updated while it is read.
        let bytes = Bytes::copy_from_slice(&self.from_client[..len]);
        let exchange = extended_exchange(&bytes).expect("the same bytes");
        // The statement: the one parsed in this exchange, or one the client prepared earlier.
        let (statement, parsed) = match exchange.parse {
            Some((name, rest)) => {
                let text = protocol::cstr(rest).map(|(t, _)| t).unwrap_or_default();
                if name != exchange.statement_name || batch::analyze(text, tables).is_none() {
                    return Ok(None);
                }
                (
                    self.new_statement(name, bytes.slice_ref(rest)),
                    Some(bytes.slice_ref(name)),
                )
            }
            None => {
                let statement = if exchange.statement_name.is_empty() {
                    self.unnamed.as_ref()
                } else {
                    self.statements.get(exchange.statement_name)
                };
                match statement {
                    Some(statement) => (statement.clone(), None),
                    None => return Ok(None),
                }
            }
        };
        let Some(insert) = statement
            .batch
            .clone()
            .filter(|insert| batch::enabled(&insert.table, tables))
        else {
            return Ok(None);
        };
        let Some((declared, formats, values)) =
            bound_values(&statement.parse_rest, exchange.bind_rest)
        else {
            return Ok(None);
        };
        if formats.len() != insert.params {
            return Ok(None); // the server will say what is wrong with it
        }
        let mut types = declared;
        types.resize(insert.params, 0);
        let copy = Key::copy_form(&insert, Some(&types), &formats);
        let alone = alone_messages(&statement.parse_rest, exchange.bind_rest, exchange.describe);
        let values = Values::Bound {
            formats,
            values: bytes.slice_ref(values),
        };
        self.from_client.advance(len);
        let parse = parsed.is_some();
        if let Some(name) = parsed {
            // The gateway answers this Parse; the session remembers the statement as on_parse would.
            if name.is_empty() {
                self.unnamed = Some(statement);
            } else {
                self.check_statement_room(&name)?;
                self.statements.insert(name, statement);
            }
        }
        Ok(Some(Waiting {
            key: self.batch_key(&insert, Some(types), copy),
            row: Some(Row {
                insert,
                values,
                alone,
                drop_parse_complete: !parse,
            }),
            parse,
            describe: exchange.describe,
            extended: true,
        }))
    }

    /// The batch key for a row of this session. application_name is left out of it: it does not change what a
    /// row means, and leaving it in would keep apart clients that differ only in their name.
    fn batch_key(&mut self, insert: &Insert, types: Option<Vec<u32>>, copy: CopyForm) -> Key {
        let identity = match &self.batch_identity {
            Some(identity) if Arc::ptr_eq(&identity.0, &self.settings) => identity,
            _ => {
                let mut settings = (*self.settings).clone();
                settings.values.remove("application_name");
                self.batch_identity.insert((
                    self.settings.clone(),
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

    /// Queues the batched exchanges and answers each once its row's batch has committed (or its error),
    /// in the order the client sent them. A client that leaves meanwhile withdraws its rows not yet in a batch.
    pub(super) async fn run_batched(&mut self) -> Result<(), End> {
        let mut waiting = std::mem::take(&mut self.batched);
        let mut tickets = Vec::with_capacity(waiting.len());
        for entry in waiting.iter_mut() {
            let row = entry.row.take().expect("each row is submitted once");
            let submit = batch::submit(&self.shared, entry.key.clone(), row);
            tokio::select! {
                ticket = submit => tickets.push(ticket),
                _ = client_gone(&mut self.client, &mut self.from_client) => return Err(End::Client),
            }
        }
        for (entry, ticket) in waiting.iter().zip(tickets) {
            let outcome = tokio::select! {
                outcome = ticket => outcome.unwrap_or_else(|_| Outcome::Failed(PgError::error(
                    "XX000",
                    "regiongate: the batch of this row was abandoned",
                ))),
                _ = client_gone(&mut self.client, &mut self.from_client) => return Err(End::Client),
            };
            match outcome {
                Outcome::Committed(lsn) => {
                    self.wrote_at(lsn);
                    if entry.parse {
                        self.to_client.extend_from_slice(b"1\0\0\0\x04");
                    }
                    if entry.extended {
                        self.to_client.extend_from_slice(b"2\0\0\0\x04");
                    }
                    if entry.describe {
                        self.to_client.extend_from_slice(b"n\0\0\0\x04");
                    }
                    self.to_client
                        .extend_from_slice(b"C\0\0\0\x0fINSERT 0 1\0Z\0\0\0\x05I");
                }
                Outcome::Answered(answers, lsn) => {
                    self.wrote_at(lsn);
                    self.to_client.extend_from_slice(&answers);
                }
                Outcome::Failed(error) => {
                    METRICS.error_sent(&error.code);
                    error.encode(&mut self.to_client);
                    protocol::ready_for_query(&mut self.to_client, b'I');
                }
            }
        }
        Ok(())
    }
}

impl Session {
    /// Read your writes after a batched insert: later reads wait for a replica at this WAL position.
    fn wrote_at(&mut self, lsn: Option<regions::Lsn>) {
        if let Some(lsn) = lsn {
            self.reads.min_lsn = Some(self.reads.min_lsn.map_or(lsn, |old| old.max(lsn)));
        }
    }
}

/// Completes only when the client has gone (end of stream or a broken socket). Bytes it sends meanwhile are
/// kept for later, up to the high-water mark; past it, only the answers are awaited.
async fn client_gone(client: &mut Stream, buffer: &mut BytesMut) {
    loop {
        if buffer.len() >= HIGH_WATER {
            return std::future::pending().await;
        }
        buffer.reserve(4096);
        match client.read_buf(buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
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
    let (mut tag, mut body) = next(b"PB")?;
    let mut parse = None;
    if tag == b'P' {
        parse = Some(protocol::cstr(body)?);
        (tag, body) = next(b"B")?;
    }
    debug_assert_eq!(tag, b'B');
    let (portal, rest) = protocol::cstr(body)?;
    let (statement_name, bind_rest) = protocol::cstr(rest)?;
    if !portal.is_empty() {
        return None;
    }
    let (mut tag, mut body) = next(b"DE")?;
    let mut describe = false;
    if tag == b'D' {
        if body != b"P\0" {
            return None;
        }
        describe = true;
        (tag, body) = next(b"E")?;
    }
    debug_assert_eq!(tag, b'E');
    if protocol::cstr(body)?.0 != b"" {
        return None;
    }
    next(b"S")?;
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
    protocol::renamed(&mut out, b'B', b"\0", b"", bind_rest);
    if describe {
        out.extend_from_slice(b"D\0\0\0\x06P\0");
    }
    out.extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04");
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
