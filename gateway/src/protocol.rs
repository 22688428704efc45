//! PostgreSQL wire-protocol framing and the few messages the gateway reads or writes itself.
//!
//! Every message after startup is `tag: u8, length: i32 (counting itself), body`. The hot path only looks at
//! the five-byte header of most messages and forwards their bytes untouched; it decodes the bodies of just
//! the messages it must act on (Query, Parse, Bind, Describe, Close, ReadyForQuery, ErrorResponse,
//! CommandComplete, ParameterStatus, BackendKeyData). See "Message Formats" in the protocol documentation.
//!
//! This is the one codec for traffic: frames are read and built here, and feature code names the messages it
//! writes ([`command_complete`], [`execute`], ...) instead of spelling tag bytes. Two other crates speak the
//! protocol at the edges, where a whole exchange is theirs: pgwire decodes the client's StartupMessage, runs
//! SCRAM on the client side of authentication and serves the admin console; postgres-protocol computes the
//! client half of SCRAM and md5 when the gateway logs in to a server. Neither touches a forwarded message.

use bytes::{BufMut, BytesMut};
use std::borrow::Cow;

/// Tag byte plus the length word.
pub const HEADER_LEN: usize = 5;

/// A message header that claims less than the length word itself is garbage, not a message.
#[derive(Debug, PartialEq, Eq)]
pub struct BadLength(pub i32);

/// The tag and total size (tag included) of the message at the start of `buf`, if its header is there.
#[inline]
pub fn peek_header(buf: &[u8]) -> Option<Result<(u8, usize), BadLength>> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Some(Err(BadLength(len)));
    }
    Some(Ok((buf[0], len as usize + 1)))
}

/// Splits a NUL-terminated string off the front of `buf`.
#[inline]
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(0, buf)?;
    Some((&buf[..end], &buf[end + 1..]))
}

/// The body of a whole message (after tag and length).
#[inline]
pub fn body(message: &[u8]) -> &[u8] {
    &message[HEADER_LEN..]
}

/// Writes a message header with a placeholder length; `finish` fills the length in.
#[inline]
pub(crate) fn start(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    at
}

#[inline]
pub(crate) fn finish(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub(crate) fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

/// An error or notice to send to a client: the fields psql and drivers show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: &'static str,
    /// The SQLSTATE.
    pub code: Cow<'static, str>,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn error(code: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            severity: "ERROR",
            code: Cow::Borrowed(code),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            severity: "FATAL",
            ..PgError::error(code, message)
        }
    }

    /// An ErrorResponse body from a server, as an error to pass on or act on.
    pub fn from_server(body: &[u8]) -> PgError {
        let mut error = PgError::error("XX000", "");
        for (field, value) in error_field_values(body) {
            let text = || String::from_utf8_lossy(value).into_owned();
            match field {
                // 'V' is never localized; 'S' may be.
                b'V' | b'S' => {
                    error.severity = match value {
                        b"FATAL" => "FATAL",
                        b"PANIC" => "PANIC",
                        _ if field == b'V' => "ERROR",
                        _ => error.severity,
                    }
                }
                b'C' => error.code = Cow::Owned(text()),
                b'M' => error.message = text(),
                b'D' => error.detail = Some(text()),
                b'H' => error.hint = Some(text()),
                _ => {}
            }
        }
        error
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> PgError {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> PgError {
        self.hint = Some(hint.into());
        self
    }

    /// A statement that fails on any PostgreSQL server with this error (a PL/pgSQL RAISE in a DO block, which
    /// hot standbys run too): for an error the gateway finds in one statement of a request, so that the server
    /// treats it as its own, rolling back the request's implicit transaction or aborting the client's.
    pub fn raising_statement(&self) -> String {
        let mut raise = format!(
            "RAISE EXCEPTION USING ERRCODE = {}, MESSAGE = {}",
            quote_literal(&self.code),
            quote_literal(&self.message)
        );
        for (field, value) in [("DETAIL", &self.detail), ("HINT", &self.hint)] {
            if let Some(value) = value {
                raise.push_str(&format!(", {field} = {}", quote_literal(value)));
            }
        }
        // A dollar quote whose tag the body does not contain.
        let mut tag = String::from("$regiongate$");
        while raise.contains(&tag) {
            tag.insert(tag.len() - 1, '_');
        }
        format!("DO {tag} BEGIN {raise}; END {tag}")
    }

    /// ErrorResponse ('E').
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_as(out, b'E');
    }

    /// The same fields as a NoticeResponse ('N'): for a severity of NOTICE or WARNING.
    pub fn encode_notice(&self, out: &mut BytesMut) {
        self.encode_as(out, tag::NOTICE_RESPONSE);
    }

    fn encode_as(&self, out: &mut BytesMut, message_tag: u8) {
        let at = start(out, message_tag);
        out.put_u8(b'S');
        put_cstr(out, self.severity.as_bytes());
        out.put_u8(b'V');
        put_cstr(out, self.severity.as_bytes());
        out.put_u8(b'C');
        put_cstr(out, self.code.as_bytes());
        out.put_u8(b'M');
        put_cstr(out, self.message.as_bytes());
        for (field, value) in [(b'D', &self.detail), (b'H', &self.hint)] {
            if let Some(value) = value {
                out.put_u8(field);
                put_cstr(out, value.as_bytes());
            }
        }
        out.put_u8(0);
        finish(out, at);
    }
}

/// Message tags, by name. The same byte means different messages in the two directions (`D` is Describe from
/// a client and DataRow from a server), so each constant says which side sends it.
pub mod tag {
    // Frontend (client to server).
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const CLOSE: u8 = b'C';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_FAIL: u8 = b'f';
    // Both directions.
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    // Backend (server to client).
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const NO_DATA: u8 = b'n';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const DATA_ROW: u8 = b'D';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const AUTHENTICATION: u8 = b'R';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
    pub const BACKEND_KEY_DATA: u8 = b'K';
}

/// A transaction status, as ReadyForQuery carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (statements are refused until it ends).
    Failed,
}

impl TxStatus {
    /// The status a ReadyForQuery body's byte gives (anything unknown is read as idle).
    pub fn from_byte(byte: u8) -> TxStatus {
        match byte {
            b'T' => TxStatus::InTransaction,
            b'E' => TxStatus::Failed,
            _ => TxStatus::Idle,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }

    pub fn is_idle(self) -> bool {
        self == TxStatus::Idle
    }
}

/// A message with an empty body (ParseComplete, Sync, ...).
#[inline]
fn empty(out: &mut BytesMut, tag: u8) {
    out.put_slice(&[tag, 0, 0, 0, 4]);
}

/// Writes a whole message: the tag, then what `body` writes, with the length filled in.
#[inline]
pub fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    let at = start(out, tag);
    body(out);
    finish(out, at);
}

pub fn ready_for_query(out: &mut BytesMut, status: TxStatus) {
    out.put_slice(&[tag::READY_FOR_QUERY, 0, 0, 0, 5, status.byte()]);
}

pub fn authentication_ok(out: &mut BytesMut) {
    out.put_slice(&[tag::AUTHENTICATION, 0, 0, 0, 8, 0, 0, 0, 0]);
}

/// CommandComplete with its command tag (`INSERT 0 1`, `BEGIN`).
pub fn command_complete(out: &mut BytesMut, command: &str) {
    message(out, tag::COMMAND_COMPLETE, |out| {
        put_cstr(out, command.as_bytes())
    });
}

pub fn parse_complete(out: &mut BytesMut) {
    empty(out, tag::PARSE_COMPLETE);
}

pub fn bind_complete(out: &mut BytesMut) {
    empty(out, tag::BIND_COMPLETE);
}

pub fn no_data(out: &mut BytesMut) {
    empty(out, tag::NO_DATA);
}

/// Describe of a portal.
pub fn describe_portal(out: &mut BytesMut, portal: &[u8]) {
    message(out, tag::DESCRIBE, |out| {
        out.put_u8(b'P');
        put_cstr(out, portal);
    });
}

/// Execute of a portal; `max_rows` 0 runs it to completion.
pub fn execute(out: &mut BytesMut, portal: &[u8], max_rows: i32) {
    message(out, tag::EXECUTE, |out| {
        put_cstr(out, portal);
        out.put_i32(max_rows);
    });
}

pub fn copy_done(out: &mut BytesMut) {
    empty(out, tag::COPY_DONE);
}

pub fn query(out: &mut BytesMut, sql: &str) {
    message(out, tag::QUERY, |out| put_cstr(out, sql.as_bytes()));
}

pub fn sync(out: &mut BytesMut) {
    empty(out, tag::SYNC);
}

pub fn terminate(out: &mut BytesMut) {
    empty(out, tag::TERMINATE);
}

/// A Parse message naming the statement `name`; `rest` is the original body after the name (query text,
/// parameter types), copied verbatim.
pub fn parse_renamed(out: &mut BytesMut, name: &[u8], rest: &[u8]) {
    let at = start(out, b'P');
    put_cstr(out, name);
    out.put_slice(rest);
    finish(out, at);
}

/// A Bind, Describe or Close message whose statement name is replaced: `head` is what precedes the name in
/// the body (portal name for Bind, the 'S' byte for Describe/Close), `rest` what follows it.
pub fn renamed(out: &mut BytesMut, tag: u8, head: &[u8], name: &[u8], rest: &[u8]) {
    let at = start(out, tag);
    out.put_slice(head);
    put_cstr(out, name);
    out.put_slice(rest);
    finish(out, at);
}

/// The fields of an ErrorResponse or NoticeResponse body: (type byte, value), up to the terminator.
pub fn error_field_values(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (&field, tail) = rest.split_first()?;
        if field == 0 {
            return None;
        }
        let (value, tail) = cstr(tail)?;
        rest = tail;
        Some((field, value))
    })
}

/// The SQLSTATE and message of an ErrorResponse body, for logs and decisions.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    for (field, value) in error_field_values(body) {
        match field {
            b'C' => code = String::from_utf8_lossy(value).into_owned(),
            b'M' => message = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// An ErrorResponse (or NoticeResponse) rebuilt from `body` with its texts passed through `text` (message,
/// detail, hint, context) and its position (a character count, 1-based) through `position`.
pub fn map_error(
    body: &[u8],
    text: impl Fn(&str) -> String,
    position: impl Fn(usize) -> usize,
) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len() + 32);
    let at = start(&mut out, b'E');
    for (field, value) in error_field_values(body) {
        out.put_u8(field);
        let value = String::from_utf8_lossy(value);
        match field {
            b'M' | b'D' | b'H' | b'W' => put_cstr(&mut out, text(&value).as_bytes()),
            b'P' => match value.parse::<usize>() {
                Ok(p) => put_cstr(&mut out, position(p).to_string().as_bytes()),
                Err(_) => put_cstr(&mut out, value.as_bytes()),
            },
            _ => put_cstr(&mut out, value.as_bytes()),
        }
    }
    out.put_u8(0);
    finish(&mut out, at);
    out
}

/// The name and value of a ParameterStatus body.
pub fn parameter_status(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (name, rest) = cstr(body)?;
    let (value, _) = cstr(rest)?;
    Some((name, value))
}

/// The columns of a DataRow body as text (None for NULL); a malformed body gives the columns up to the fault.
pub fn data_row_text(body: &[u8]) -> Vec<Option<String>> {
    let mut columns = Vec::new();
    let Some(count) = body.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])) else {
        return columns;
    };
    let mut rest = &body[2..];
    for _ in 0..count {
        let Some(len) = rest
            .get(..4)
            .map(|l| i32::from_be_bytes([l[0], l[1], l[2], l[3]]))
        else {
            break;
        };
        rest = &rest[4..];
        if len < 0 {
            columns.push(None);
            continue;
        }
        let Some(value) = rest.get(..len as usize) else {
            break;
        };
        columns.push(Some(String::from_utf8_lossy(value).into_owned()));
        rest = &rest[len as usize..];
    }
    columns
}

/// Parameter `n` (zero-based) of a Bind, from `rest`: what follows the statement name (format codes, then
/// the values). Some(None) for NULL; None when the message has no such parameter or is malformed.
pub fn bind_parameter(rest: &[u8], n: usize) -> Option<Option<&[u8]>> {
    let int16 = |at: usize| {
        rest.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    };
    let formats = int16(0)?;
    let mut at = 2 + 2 * formats;
    let count = int16(at)?;
    at += 2;
    if n >= count {
        return None;
    }
    for i in 0..=n {
        let len = rest
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))?;
        at += 4;
        let value = if len < 0 {
            None
        } else {
            let value = rest.get(at..at + len as usize)?;
            at += len as usize;
            Some(value)
        };
        if i == n {
            return Some(value);
        }
    }
    None
}

/// The text of a Query body (without its NUL), if well-formed.
///
/// A well-formed body ends with the text's NUL: then the text is all before it, found without a search. (A
/// NUL inside such a text makes the message malformed, and the server refuses it as such, whatever the
/// gateway takes its text to be.) Otherwise the text ends at the first NUL, if any.
#[inline]
pub fn query_text(body: &[u8]) -> Option<&[u8]> {
    match body.split_last() {
        Some((0, text)) => Some(text),
        _ => cstr(body).map(|(text, _)| text),
    }
}

pub fn parameter_status_message(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    let at = start(out, b'S');
    put_cstr(out, name);
    put_cstr(out, value);
    finish(out, at);
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    let at = start(out, b'K');
    out.put_i32(pid);
    out.put_i32(secret);
    finish(out, at);
}

/// Quotes a string as an SQL literal ('it''s'), for SET statements the gateway composes.
pub fn quote_literal(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    if value.contains('\\') {
        quoted.push('E');
    }
    quoted.push('\'');
    for c in value.chars() {
        match c {
            '\'' => quoted.push_str("''"),
            '\\' => quoted.push_str("\\\\"),
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    quoted
}

/// Quotes an identifier ("Name").
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_five_bytes_and_a_sane_length() {
        assert_eq!(peek_header(b"Q\0\0"), None);
        assert_eq!(peek_header(b"Q\0\0\0\x09"), Some(Ok((b'Q', 10))));
        assert_eq!(peek_header(b"Q\0\0\0\x03"), Some(Err(BadLength(3))));
        assert_eq!(peek_header(b"Q\xff\xff\xff\xff"), Some(Err(BadLength(-1))));
    }

    #[test]
    fn error_round_trip() {
        let mut out = BytesMut::new();
        PgError::error("53300", "no connection").encode(&mut out);
        let (tag, len) = peek_header(&out).unwrap().unwrap();
        assert_eq!((tag, len), (b'E', out.len()));
        assert_eq!(
            error_fields(body(&out)),
            ("53300".to_string(), "no connection".to_string())
        );
    }

    #[test]
    fn named_messages_are_framed_as_the_protocol_spells_them() {
        let mut out = BytesMut::new();
        command_complete(&mut out, "INSERT 0 1");
        ready_for_query(&mut out, TxStatus::Idle);
        assert_eq!(&out[..], b"C\0\0\0\x0fINSERT 0 1\0Z\0\0\0\x05I");
        out.clear();
        parse_complete(&mut out);
        bind_complete(&mut out);
        no_data(&mut out);
        describe_portal(&mut out, b"");
        execute(&mut out, b"", 0);
        sync(&mut out);
        copy_done(&mut out);
        authentication_ok(&mut out);
        assert_eq!(
            &out[..],
            &b"1\0\0\0\x042\0\0\0\x04n\0\0\0\x04D\0\0\0\x06P\0E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04c\0\0\0\x04R\0\0\0\x08\0\0\0\0"[..]
        );
        for status in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            assert_eq!(TxStatus::from_byte(status.byte()), status);
        }
    }

    #[test]
    fn renaming_keeps_the_rest() {
        let mut out = BytesMut::new();
        renamed(&mut out, b'B', b"portal\0", b"rg_1", b"\0\0\0\0\0\0");
        assert_eq!(&out[..], b"B\0\0\0\x16portal\0rg_1\0\0\0\0\0\0\0");
    }

    #[test]
    fn bind_parameters_are_found_and_bounded() {
        // No format codes; two parameters: 'app.x' and NULL.
        let rest = b"\0\0\0\x02\0\0\0\x05app.x\xff\xff\xff\xff\0\0";
        assert_eq!(bind_parameter(rest, 0), Some(Some(&b"app.x"[..])));
        assert_eq!(bind_parameter(rest, 1), Some(None));
        assert_eq!(bind_parameter(rest, 2), None);
        assert_eq!(bind_parameter(b"\0\0\0\x01\0\0\0\x09ab", 0), None);
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
