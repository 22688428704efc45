//! What each client message asks of the session before it goes to the server: statements prepared where they
//! run and renamed to their server-side names, settings changes noted for a capture, pins for what cannot
//! move. Every message sent is told to the protocol state, so that its answer finds its way back.

use super::settings::{Reset, Touch};
use super::state::Own;
use super::statements::{self, Effect, SqlPrepared, Statement};
use super::Session;
use crate::protocol::{self, tag, PgError};
use crate::sql::{self, Kind};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

impl Session {
    /// One complete client message, with a server connection attached.
    pub(super) fn handle_message(
        &mut self,
        message_tag: u8,
        message: Bytes,
        query: Option<super::observe::Query>,
    ) -> Result<(), PgError> {
        match message_tag {
            tag::QUERY => {
                self.observer.request_sent();
                // The caller shapes every Query whose text it can find.
                let Some(super::observe::Query { shape, text }) = query else {
                    return Err(PgError::fatal("08P01", "invalid Query message"));
                };
                let text = message.slice(text);
                self.observe_statement(shape.hash, shape.reads(), &text, &text);
                self.on_query(&message, &text, shape)?;
                self.observer.set_statement(Some(text));
            }
            tag::PARSE => self.on_parse(message)?,
            tag::BIND | tag::DESCRIBE => self.on_statement_use(message_tag, message)?,
            tag::CLOSE => self.on_close(message)?,
            tag::EXECUTE => {
                self.io.to_server.extend_from_slice(&message);
                self.state.extended();
            }
            // A Flush asks for what is owed so far; alone (psycopg's pipeline sends one after its Sync) it
            // opens no exchange, and must not keep the connection from its release.
            tag::FLUSH => self.io.to_server.extend_from_slice(&message),
            tag::SYNC => {
                self.observer.request_sent();
                self.io.to_server.extend_from_slice(&message);
                self.state.sync();
            }
            tag::FUNCTION_CALL => {
                self.observer.request_sent();
                // A function called by OID may change anything: read the settings back afterwards.
                self.settings.touch();
                self.io.to_server.extend_from_slice(&message);
                self.state.query(Reset::Nothing, Vec::new());
            }
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {
                self.io.to_server.extend_from_slice(&message)
            }
            other => {
                return Err(PgError::fatal(
                    "08P01",
                    format!("invalid frontend message type {other}"),
                ))
            }
        }
        Ok(())
    }

    pub(super) fn pin(&mut self, reason: &'static str) {
        if self.pinned.is_none() {
            event!(
                self,
                info,
                reason,
                "client pinned to its server connection for the rest of the session"
            );
            self.pinned = Some(reason);
        }
    }

    /// Feeds the N+1 detector one statement about to run; `values` are what tells one run of it from another.
    pub(super) fn observe_statement(
        &mut self,
        shape: u64,
        read: bool,
        text: &Bytes,
        values: &[u8],
    ) {
        self.observer.statement_runs(
            shape,
            read,
            text,
            values,
            &self.shared.nplus1,
            &self.handle.entry,
        );
    }

    /// A Query. `shape`: what the fingerprint lexer found in its text.
    pub(super) fn on_query(
        &mut self,
        message: &[u8],
        text: &[u8],
        shape: crate::fingerprint::ShapeId,
    ) -> Result<(), PgError> {
        if let Some(error) = crate::route::hint::malformed(text) {
            // The whole request fails, where it would have run.
            protocol::query(&mut self.io.to_server, &error.raising_statement());
            self.state.plain_query();
            return Ok(());
        }
        if sql::changes_schema(&shape) {
            self.shared.statement_names.forget_all();
        }
        if sql::plainly_other(&shape) {
            // Most queries: nothing in them for the session to track.
            self.io.to_server.extend_from_slice(message);
            self.state.plain_query();
            return Ok(());
        }
        let mut reset = Reset::Nothing;
        let mut rewrites: Vec<(std::ops::Range<usize>, Arc<str>)> = Vec::new();
        for range in sql::split(text) {
            let kind = sql::classify(text, range.clone());
            // A set_config in a statement classified by its head (PREPARE, EXPLAIN, CREATE ... AS, DECLARE)
            // changes settings all the same.
            let touch = Touch::of(&kind).or_else(|| Touch::hidden(text, range.clone()));
            if let Some(touch) = &touch {
                self.settings.touched(touch);
                reset.add(touch.reset.clone());
            }
            if !self.statements.sql.is_empty()
                && !matches!(
                    kind,
                    Kind::Execute { .. } | Kind::Prepare { .. } | Kind::Deallocate { .. }
                )
            {
                // EXPLAIN EXECUTE p, CREATE TABLE t AS EXECUTE p.
                for (name, at) in sql::executed_names(text, range.clone()) {
                    if let Some(prepared) = self.statements.sql.get(&name).cloned() {
                        self.run_sql_prepared(&prepared);
                        rewrites.push((at, prepared.server_name.clone()));
                    }
                }
            }
            if let Some(error) = Self::refused_setting(&kind, text, range.clone()) {
                rewrites.push((range.clone(), error.raising_statement().into()));
                continue;
            }
            match kind {
                Kind::Other | Kind::Set { .. } | Kind::Reset { .. } | Kind::SetConfig { .. } => {}
                Kind::Pin(reason) => self.pin(reason),
                Kind::Prepare { name, at } if self.statements.sql.contains_key(&name) => {
                    // PostgreSQL refuses a second PREPARE of a name with 42P05 and keeps the first: let the
                    // server say so, under the name the first has there.
                    let existing = self.statements.sql[&name].clone();
                    self.ensure_sql_prepared(&existing);
                    rewrites.push((at, existing.server_name.clone()));
                }
                Kind::Prepare { name, at } => {
                    let server_name: Arc<str> = self.shared.statement_names.fresh("q").into();
                    let mut prepare =
                        String::from_utf8_lossy(&text[range.start..at.start]).into_owned();
                    prepare.push_str(&server_name);
                    prepare.push_str(&String::from_utf8_lossy(&text[at.end..range.end]));
                    self.conn().note_statement(server_name.clone());
                    rewrites.push((at, server_name.clone()));
                    let prepared = SqlPrepared {
                        server_name,
                        prepare,
                        touch,
                        access: self.shared.classifier.load().prepared(&text[range]),
                    };
                    self.statements.sql.insert(name, Arc::new(prepared));
                }
                Kind::Execute { name, at } => {
                    if let Some(prepared) = self.statements.sql.get(&name).cloned() {
                        self.run_sql_prepared(&prepared);
                        rewrites.push((at, prepared.server_name.clone()));
                    }
                }
                Kind::Deallocate {
                    name: Some((name, at)),
                } => {
                    if let Some(prepared) = self.statements.sql.remove(&name) {
                        self.ensure_sql_prepared(&prepared);
                        self.conn().forget_statement(&prepared.server_name);
                        rewrites.push((at, prepared.server_name.clone()));
                    } else if let Some(server_name) = self.deallocate_protocol_statement(&name) {
                        // A protocol-level statement deallocated in SQL (libpq before 17 evicts this way).
                        rewrites.push((at, server_name));
                    }
                }
                Kind::Deallocate { name: None } | Kind::DiscardAll => {
                    self.statements.clear();
                    self.conn().forget_statements();
                }
            }
        }
        if rewrites.is_empty() {
            self.io.to_server.extend_from_slice(message);
            self.state.query(reset, Vec::new());
        } else {
            let (rewritten, shifts) = statements::rename(text, rewrites);
            protocol::query(&mut self.io.to_server, &rewritten);
            self.state.query(reset, shifts);
        }
        Ok(())
    }

    /// The error for a SET of one of the gateway's own settings (`regiongate.max_lag`) to a value it cannot
    /// use, checked before it runs: the server accepts any value for a name it does not know.
    fn refused_setting(kind: &Kind, text: &[u8], range: std::ops::Range<usize>) -> Option<PgError> {
        let set = match kind {
            Kind::Set { name } => name.starts_with(crate::route::SESSION_SETTING_PREFIX),
            // SET LOCAL
            Kind::Other => starts_with_set(&text[range.clone()]),
            _ => false,
        };
        if !set {
            return None;
        }
        let (name, value) =
            sql::set_with_prefix(text, range, crate::route::SESSION_SETTING_PREFIX)?;
        crate::route::check_session_setting(&name, &value).err()
    }

    /// A SQL-level prepared statement runs (EXECUTE, EXPLAIN EXECUTE): it must exist on this connection, and
    /// what it does to settings is noted.
    fn run_sql_prepared(&mut self, prepared: &SqlPrepared) {
        if let Some(touch) = &prepared.touch {
            self.settings.touched(touch);
        }
        self.ensure_sql_prepared(prepared);
    }

    /// `DEALLOCATE name` of a protocol-level statement: the client forgets it, and the server-side name to
    /// deallocate instead, made to exist on this connection first (a Parse and Sync of the gateway's own), as
    /// PostgreSQL would find it. None when the client has no such statement, or mid-exchange.
    fn deallocate_protocol_statement(&mut self, name: &str) -> Option<Arc<str>> {
        if self.state.in_exchange() || !self.statements.named.contains_key(name.as_bytes()) {
            return None;
        }
        let statement = self.statements.named.remove(name.as_bytes())?;
        if !self.conn().forget_statement(&statement.server_name) {
            protocol::parse_renamed(
                &mut self.io.to_server,
                statement.server_name.as_bytes(),
                &statement.parse_rest,
            );
            protocol::sync(&mut self.io.to_server);
            self.state.own_parse_and_sync();
        }
        Some(statement.server_name.clone())
    }

    /// Runs a SQL-level PREPARE first on a server connection that lacks it (its answers swallowed).
    fn ensure_sql_prepared(&mut self, prepared: &SqlPrepared) {
        if self.conn().note_statement(prepared.server_name.clone()) {
            self.send_own_query(&prepared.prepare, Own::Plain);
        }
    }

    /// Sends a query of the gateway's own ahead of what follows; its answers never reach the client.
    pub(super) fn send_own_query(&mut self, sql: &str, own: Own) {
        protocol::query(&mut self.io.to_server, sql);
        self.state.own(own);
    }

    /// A client's statement from its Parse: what it does, where it may run, its fingerprint, whether it can
    /// be batched, and its server-side name (shared by every client preparing the same content).
    pub(super) fn new_statement(&mut self, name: &[u8], parse_rest: Bytes) -> Arc<Statement> {
        let text = protocol::cstr(&parse_rest)
            .map(|(t, _)| t)
            .unwrap_or_default();
        let effect = Effect::of(text);
        // One shape for both routing's cache and N+1 detection, computed once per prepared statement.
        let fingerprint = (self.observer.detecting() || self.routing_enabled())
            .then(|| crate::fingerprint::shape_id(text));
        let class = fingerprint
            .as_ref()
            .filter(|_| self.routing_enabled())
            .map(|shape| {
                self.shared
                    .classifier
                    .load()
                    .classify_shaped(text, shape.hash)
            });
        let (shape, reads) = fingerprint.map_or((0, false), |s| (s.hash, s.reads()));
        let batch =
            crate::batch::analyze(text, &self.shared.config.load().batching.tables).map(Arc::new);
        let server_name = if name.is_empty() {
            Arc::from("")
        } else {
            self.shared.statement_names.name_for(&parse_rest)
        };
        Arc::new(Statement {
            server_name,
            parse_rest,
            effect,
            class,
            shape,
            reads,
            batch,
        })
    }

    pub(super) fn on_parse(&mut self, message: Bytes) -> Result<(), PgError> {
        let body = protocol::body(&message);
        let (name, rest) =
            protocol::cstr(body).ok_or_else(|| PgError::fatal("08P01", "invalid Parse message"))?;
        let renamed = self
            .refused_parse(rest)
            .or_else(|| self.sql_prepared_in_parse(rest));
        let rest: &[u8] = renamed.as_deref().unwrap_or(rest);
        let rest_bytes = match &renamed {
            Some(renamed) => renamed.clone(),
            None => message.slice_ref(rest),
        };
        let statement = self.new_statement(name, rest_bytes);
        if name.is_empty() {
            self.statements.unnamed = Some(statement);
            self.conn().set_unnamed_valid(true);
            if renamed.is_some() {
                protocol::parse_renamed(&mut self.io.to_server, b"", rest);
            } else {
                self.io.to_server.extend_from_slice(&message);
            }
            self.state.parse(false, None);
            return Ok(());
        }
        let server_name = statement.server_name.clone();
        self.statements.insert(message.slice_ref(name), statement)?;
        let conn = self.conn();
        if conn.has_statement(&server_name) {
            // This server connection has the statement already. The client still expects its own
            // ParseComplete and any parse error, so parse the text into the unnamed slot instead.
            conn.set_unnamed_valid(false);
            protocol::parse_renamed(&mut self.io.to_server, b"", rest);
            self.state.parse(false, None);
        } else {
            conn.note_statement(server_name.clone());
            protocol::parse_renamed(&mut self.io.to_server, server_name.as_bytes(), rest);
            self.state.parse(false, Some(server_name));
        }
        Ok(())
    }

    /// A Parse of a SET of a gateway setting to a bad value, or of a statement with a malformed routing hint:
    /// the Parse body with a statement that fails as the original should. A hinted statement with parameters
    /// keeps its text (the raising statement could not take its Bind), and its hint is ignored with a warning.
    fn refused_parse(&self, rest: &[u8]) -> Option<Bytes> {
        let (text, after) = protocol::cstr(rest)?;
        let error = match crate::route::hint::malformed(text) {
            Some(_) if has_parameters(text) => {
                // Not the statement's text: its literals may be secrets.
                event!(
                    self,
                    warn,
                    "a malformed routing hint in a statement with parameters is ignored"
                );
                return None;
            }
            Some(error) => error,
            None if starts_with_set(text) => {
                let range = sql::split(text).next()?;
                Self::refused_setting(&sql::classify(text, range.clone()), text, range)?
            }
            None => return None,
        };
        let mut body = BytesMut::with_capacity(rest.len() + 128);
        protocol::put_cstr(&mut body, error.raising_statement().as_bytes());
        body.extend_from_slice(after);
        Some(body.freeze())
    }

    /// A Parse whose text runs a SQL-level prepared statement of this client (`EXECUTE p`, as drivers that
    /// prepare everything send it): the Parse body with the server-side name, the statement made ready on
    /// this connection, and the client pinned to it (the name lives there). None when there is no such name.
    fn sql_prepared_in_parse(&mut self, rest: &[u8]) -> Option<Bytes> {
        if self.statements.sql.is_empty() {
            return None;
        }
        let (text, after) = protocol::cstr(rest)?;
        let range = sql::split(text).next()?;
        let mut names = sql::executed_names(text, range);
        names.retain(|(name, _)| self.statements.sql.contains_key(name));
        if names.is_empty() {
            return None;
        }
        // Preparing one here takes a simple Query, which cannot go in the middle of an extended exchange:
        // then the server answers for the name as it is (26000).
        let missing = names.iter().any(|(name, _)| {
            let server_name = &self.statements.sql[name].server_name;
            !self
                .lease
                .as_mut()
                .is_some_and(|l| l.conn().has_statement(server_name))
        });
        if missing && self.state.in_exchange() {
            return None;
        }
        let mut renamed = BytesMut::with_capacity(rest.len() + 16);
        let mut at = 0;
        for (name, range) in names {
            let prepared = self.statements.sql[&name].clone();
            self.ensure_sql_prepared(&prepared);
            renamed.extend_from_slice(&text[at..range.start]);
            renamed.extend_from_slice(prepared.server_name.as_bytes());
            at = range.end;
        }
        renamed.extend_from_slice(&text[at..]);
        protocol::put_cstr(&mut renamed, b"");
        renamed.extend_from_slice(after);
        self.pin("SQL-level PREPARE/EXECUTE through the extended protocol");
        Some(renamed.freeze())
    }

    /// Bind and Describe name a statement: prepare it on this server connection if it lacks it, and use the
    /// server-side name.
    pub(super) fn on_statement_use(
        &mut self,
        message_tag: u8,
        message: Bytes,
    ) -> Result<(), PgError> {
        let body = protocol::body(&message);
        let bind = message_tag == tag::BIND;
        let invalid = || {
            let what = if bind { "Bind" } else { "Describe" };
            PgError::fatal("08P01", format!("invalid {what} message"))
        };
        self.state.extended();
        // Bind: portal name, statement name, ...; Describe: 'S' or 'P', name.
        let (head, name, rest) = if bind {
            let (portal, after) = protocol::cstr(body).ok_or_else(invalid)?;
            let (name, rest) = protocol::cstr(after).ok_or_else(invalid)?;
            (&body[..portal.len() + 1], name, rest)
        } else {
            let (&kind, after) = body.split_first().ok_or_else(invalid)?;
            if kind != b'S' {
                self.io.to_server.extend_from_slice(&message);
                return Ok(());
            }
            let (name, rest) = protocol::cstr(after).ok_or_else(invalid)?;
            (&body[..1], name, rest)
        };
        if name.is_empty() {
            if let Some(unnamed) = self.statements.unnamed.clone() {
                if !self.conn().unnamed_valid() {
                    protocol::parse_renamed(&mut self.io.to_server, b"", &unnamed.parse_rest);
                    self.state.parse(true, None);
                    self.conn().set_unnamed_valid(true);
                }
                if bind {
                    self.bound(&unnamed, rest);
                }
            }
            self.io.to_server.extend_from_slice(&message);
            return Ok(());
        }
        let Some(statement) = self.statements.named.get(name).cloned() else {
            // Not a statement of this client: the server answers 26000 (does not exist).
            self.io.to_server.extend_from_slice(&message);
            return Ok(());
        };
        if self.conn().note_statement(statement.server_name.clone()) {
            protocol::parse_renamed(
                &mut self.io.to_server,
                statement.server_name.as_bytes(),
                &statement.parse_rest,
            );
            self.state.parse(true, Some(statement.server_name.clone()));
        }
        if bind {
            self.bound(&statement, rest);
        }
        protocol::renamed(
            &mut self.io.to_server,
            message_tag,
            head,
            statement.server_name.as_bytes(),
            rest,
        );
        Ok(())
    }

    /// A Bind of `statement` with `parameters` (the rest of the Bind message): it will run.
    fn bound(&mut self, statement: &Statement, parameters: &[u8]) {
        match &statement.effect {
            Effect::None => {}
            Effect::Pin(reason) => self.pin(reason),
            Effect::Change(touch) => {
                self.settings.touched(touch);
                self.state.resets(touch.reset.clone());
                for &n in &touch.parameters {
                    // A name is text in either format; a parameter that is not a custom name needs no asking.
                    if let Some(Some(name)) = protocol::bind_parameter(parameters, n) {
                        if name.contains(&b'.') {
                            self.settings
                                .named(String::from_utf8_lossy(name).to_ascii_lowercase());
                        }
                    }
                }
            }
        }
        let text = statement.text();
        if let (Some(text), true) = (&text, self.observer.detecting()) {
            self.observe_statement(statement.shape, statement.reads, text, parameters);
        }
        self.observer.set_statement(text);
    }

    pub(super) fn on_close(&mut self, message: Bytes) -> Result<(), PgError> {
        let body = protocol::body(&message);
        let invalid = || PgError::fatal("08P01", "invalid Close message");
        let (&kind, after) = body.split_first().ok_or_else(invalid)?;
        let (name, _) = protocol::cstr(after).ok_or_else(invalid)?;
        self.state.extended();
        if kind == b'S' {
            if name.is_empty() {
                self.statements.unnamed = None;
                self.conn().set_unnamed_valid(false);
            } else if let Some(statement) = self.statements.named.remove(name) {
                // Close it on the server too, so that a session preparing and closing statements does not
                // grow the server's memory. Another client that shares it prepares it again when it needs it.
                if self.conn().forget_statement(&statement.server_name) {
                    protocol::renamed(
                        &mut self.io.to_server,
                        tag::CLOSE,
                        b"S",
                        statement.server_name.as_bytes(),
                        b"",
                    );
                    return Ok(());
                }
            }
        }
        // Not on this server connection: closing a name that does not exist still yields the CloseComplete
        // the client expects.
        self.io.to_server.extend_from_slice(&message);
        Ok(())
    }
}

/// Whether a statement starts with the word SET (SET LOCAL included, which [`sql::classify`] calls Other),
/// comments before it skipped.
fn starts_with_set(statement: &[u8]) -> bool {
    let start = crate::lexer::skip_space(statement, 0);
    statement[start..]
        .get(..3)
        .is_some_and(|head| head.eq_ignore_ascii_case(b"set"))
        && statement
            .get(start + 3)
            .is_none_or(|&next| !crate::lexer::is_ident_byte(next))
}

/// Whether a statement text has a parameter (`$1`), not counting dollar-quoted strings.
fn has_parameters(text: &[u8]) -> bool {
    crate::lexer::token_ranges(text).any(|token| {
        text[token.start] == b'$' && text.get(token.start + 1).is_some_and(u8::is_ascii_digit)
    })
}
