//! Startup and authentication, both ways.
//!
//! Client side: the first packet (SSLRequest, GSSENCRequest, CancelRequest or StartupMessage), then SCRAM-SHA-256,
//! md5 or trust against the users in the config. The SCRAM exchange and message encodings are pgwire's; a
//! user's password may be stored as a verifier so the gateway never holds the plain text.
//!
//! Server side: the gateway logs in to PostgreSQL with postgres-protocol's SCRAM client, md5 or a clear-text
//! password, and collects the server's ParameterStatus and BackendKeyData.

use crate::auth_query::{Found, LearnedSecret};
use crate::config::{is_md5_hash, AuthMethod, Config};
use crate::protocol::{self, PgError};
use crate::scram::{parse_scram_verifier, ScramVerifier};
use crate::tls::SSL_REQUEST;
use bytes::{Bytes, BytesMut};
use pgwire::api::auth::sasl::scram::ScramServerAuth;
use pgwire::messages::startup::{Authentication, PasswordMessageFamily};
use pgwire::messages::{DecodeContext, Message};
use std::collections::HashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Packets before authentication are small; PostgreSQL caps the startup packet at 10000 bytes too.
const MAX_STARTUP_PACKET: usize = 10_000;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

/// What the gateway checks each user's login against, derived once per configuration.
pub struct Credentials {
    method: AuthMethod,
    users: HashMap<String, Secret>,
    /// Users not listed are looked up on the primary (`auth.query_user`).
    pub lookup: Option<crate::auth_query::AuthQuery>,
    /// Answers SCRAM for unknown users, so a failed login does not reveal whether the user exists.
    decoy: ScramVerifier,
}

enum Secret {
    Scram(ScramVerifier),
    /// md5(password + user) in hex, as PostgreSQL stores md5 passwords.
    Md5(String),
    None,
}

impl Credentials {
    pub fn new(config: &Config) -> Credentials {
        let method = config.auth.method;
        let users = config
            .auth
            .users
            .iter()
            .map(|user| {
                let password = user.password.as_deref();
                let secret = match (method, password) {
                    (AuthMethod::ScramSha256, Some(p)) if p.starts_with("SCRAM-SHA-256$") => {
                        // validated when the config was loaded
                        parse_scram_verifier(p)
                            .map(Secret::Scram)
                            .unwrap_or(Secret::None)
                    }
                    (AuthMethod::ScramSha256, Some(p)) => {
                        Secret::Scram(ScramVerifier::from_password(p))
                    }
                    (AuthMethod::Md5, Some(p)) if is_md5_hash(p) => Secret::Md5(p[3..].to_string()),
                    (AuthMethod::Md5, Some(p)) => {
                        Secret::Md5(format!("{:x}", md5::compute(format!("{p}{}", user.name))))
                    }
                    _ => Secret::None,
                };
                (user.name.clone(), secret)
            })
            .collect();
        Credentials {
            method,
            users,
            lookup: crate::auth_query::AuthQuery::from_config(config),
            decoy: ScramVerifier::from_password(&format!("{:x}", rand::random::<u128>())),
        }
    }
}

/// The client's first packet.
pub enum FirstPacket {
    Startup(Startup),
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// The client asked for TLS and was told yes (`S`): the handshake comes next.
    Tls,
}

/// A client's StartupMessage.
#[derive(Debug, Clone)]
pub struct Startup {
    pub user: String,
    pub database: String,
    /// Run-time parameters other than user, database and options (application_name, client_encoding, ...).
    pub parameters: Vec<(String, String)>,
    /// `-c name=value` settings from the `options` parameter.
    pub options: Vec<(String, String)>,
}

/// Why a connection ended before it was a session.
#[derive(Debug)]
pub enum StartupError {
    /// The client went away (a health check, psql asking for a password): not worth a log line.
    Disconnected,
    /// The client is told this error, then the connection is closed.
    Refused(PgError),
    /// Its credentials did not match (a wrong password, an unknown user, a mechanism it cannot use): told
    /// like `Refused`, and counted against its address ([`crate::limits::Admission`]).
    Denied(PgError),
}

impl StartupError {
    /// What the client is told, if anything.
    pub fn error(&self) -> Option<&PgError> {
        match self {
            StartupError::Disconnected => None,
            StartupError::Refused(error) | StartupError::Denied(error) => Some(error),
        }
    }
}

impl From<std::io::Error> for StartupError {
    fn from(_: std::io::Error) -> Self {
        StartupError::Disconnected
    }
}

/// Reads packets until a StartupMessage or CancelRequest. An SSLRequest is answered `S` (and returned as
/// [`FirstPacket::Tls`]) when `offer_tls`, else `N`; GSS encryption is always refused (`N`), after which
/// clients go on without it.
pub async fn read_first_packet<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    offer_tls: bool,
) -> Result<FirstPacket, StartupError> {
    // Each encryption request is answered once, as PostgreSQL does (ProcessStartupPacket's ssl_done and
    // gss_done): asked again, it is a packet of an unknown protocol.
    let (mut ssl_done, mut gss_done) = (false, false);
    loop {
        let mut len_bytes = [0u8; 4];
        if stream.read_exact(&mut len_bytes).await.is_err() {
            return Err(StartupError::Disconnected);
        }
        let len = i32::from_be_bytes(len_bytes);
        if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
            return Err(StartupError::Refused(PgError::fatal(
                "08P01",
                format!("invalid length of startup packet: {len}"),
            )));
        }
        let mut packet = vec![0u8; len as usize - 4];
        stream.read_exact(&mut packet).await?;
        let code = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
        match code {
            SSL_REQUEST if offer_tls && !ssl_done => {
                stream.write_all(b"S").await?;
                stream.flush().await?;
                return Ok(FirstPacket::Tls);
            }
            SSL_REQUEST if !ssl_done => {
                ssl_done = true;
                stream.write_all(b"N").await?;
                stream.flush().await?;
            }
            GSSENC_REQUEST if !gss_done => {
                gss_done = true;
                stream.write_all(b"N").await?;
                stream.flush().await?;
            }
            CANCEL_REQUEST if packet.len() == 12 => {
                let pid = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
                let secret = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
                return Ok(FirstPacket::Cancel { pid, secret });
            }
            _ if (code >> 16) == 3 => {
                let startup = decode_startup(len_bytes, packet)?;
                return Ok(FirstPacket::Startup(startup));
            }
            _ => {
                return Err(StartupError::Refused(PgError::fatal(
                    "0A000",
                    format!(
                        "unsupported frontend protocol {}.{}: server supports 3.0",
                        code >> 16,
                        code & 0xffff
                    ),
                )))
            }
        }
    }
}

fn decode_startup(len_bytes: [u8; 4], packet: Vec<u8>) -> Result<Startup, StartupError> {
    let invalid =
        || StartupError::Refused(PgError::fatal("08P01", "invalid startup packet layout"));
    let mut buf = BytesMut::with_capacity(packet.len() + 4);
    buf.extend_from_slice(&len_bytes);
    buf.extend_from_slice(&packet);
    let message = pgwire::messages::startup::Startup::decode(&mut buf, &DecodeContext::default())
        .map_err(|_| invalid())?
        .ok_or_else(invalid)?;
    let mut parameters = Vec::new();
    let mut options = Vec::new();
    let mut user = None;
    let mut database = None;
    for (name, value) in message.parameters {
        match name.as_str() {
            "user" => user = Some(value),
            "database" => database = Some(value),
            "options" => options = parse_options(&value),
            "replication" => {
                return Err(StartupError::Refused(PgError::fatal(
                    "08P01",
                    "regiongate does not proxy replication connections",
                )))
            }
            // Protocol extensions we do not implement; libpq only sends them when asked to.
            _ if name.starts_with("_pq_.") => {}
            _ => parameters.push((name, value)),
        }
    }
    let user = user.filter(|u| !u.is_empty()).ok_or_else(|| {
        StartupError::Refused(PgError::fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        ))
    })?;
    Ok(Startup {
        database: database
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| user.clone()),
        user,
        parameters,
        options,
    })
}

/// `-c a=b --c=d` (the `options` startup parameter; `\ ` escapes a space).
fn parse_options(text: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    let mut settings = Vec::new();
    let mut iter = words.into_iter();
    while let Some(word) = iter.next() {
        let pair = if word == "-c" {
            iter.next()
        } else {
            word.strip_prefix("--")
                .or_else(|| word.strip_prefix("-c"))
                .map(str::to_string)
        };
        if let Some((name, value)) = pair.as_deref().and_then(|p| p.split_once('=')) {
            settings.push((name.replace('-', "_"), value.to_string()));
        }
    }
    settings
}

/// Authenticates the client as `startup.user`, writing the Authentication requests; on success the caller
/// sends AuthenticationOk and the rest of the startup response. For a user looked up with `auth.query`, the
/// success carries what the login proved, for the user's server connections.
pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    credentials: &Credentials,
    startup: &Startup,
) -> Result<Option<LearnedSecret>, StartupError> {
    let failed = || {
        StartupError::Denied(PgError::fatal(
            "28P01",
            format!(
                "password authentication failed for user \"{}\"",
                startup.user
            ),
        ))
    };
    let mut secret = credentials.users.get(&startup.user);
    let looked_up = match (&credentials.lookup, secret) {
        (Some(lookup), None) => {
            let found = lookup
                .lookup(&startup.user)
                .await
                .map_err(StartupError::Refused)?;
            match (credentials.method, found) {
                (AuthMethod::Md5, Found::Md5(hash)) => Some(Secret::Md5(hash)),
                (AuthMethod::ScramSha256 | AuthMethod::Trust, Found::Scram(verifier)) => {
                    Some(Secret::Scram(verifier))
                }
                (AuthMethod::Trust, Found::Md5(hash)) => Some(Secret::Md5(hash)),
                (method, Found::Scram(_) | Found::Md5(_)) => {
                    // The login fails as for a wrong password; the log says why.
                    tracing::warn!(user = %startup.user, %method, "auth.query found the user, but its password is stored in a form this auth.method cannot check");
                    None
                }
                (_, Found::Nothing) => None,
            }
        }
        _ => None,
    };
    if looked_up.is_some() {
        secret = looked_up.as_ref();
    }
    // What a login proved is kept only for users found with auth.query (their servers' logins need it);
    // recovering it costs an HMAC and a hash, so it is not done for the others.
    let looked_up_user = looked_up.is_some();
    let learned = |proved: &dyn Fn() -> Option<LearnedSecret>| {
        if looked_up_user {
            proved()
        } else {
            None
        }
    };
    match credentials.method {
        AuthMethod::Trust => match secret {
            Some(_) => Ok(None),
            // No list: any user the server accepts (it refuses at the login's first server connection).
            None if credentials.users.is_empty() => Ok(None),
            None => Err(StartupError::Denied(PgError::fatal(
                "28000",
                format!(
                    "no such user \"{}\" in the regiongate configuration",
                    startup.user
                ),
            ))),
        },
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            send(stream, Authentication::MD5Password(salt.to_vec())).await?;
            let response = read_password_message(stream).await?;
            let given = response
                .into_password()
                .map_err(|_| protocol_violation("expected a password message"))?
                .password;
            match secret {
                Some(Secret::Md5(hash)) => {
                    let mut input = hash.as_bytes().to_vec();
                    input.extend_from_slice(&salt);
                    let expected = format!("md5{:x}", md5::compute(input));
                    if constant_time_eq(expected.as_bytes(), given.as_bytes()) {
                        Ok(learned(&|| Some(LearnedSecret::Md5(hash.clone()))))
                    } else {
                        Err(failed())
                    }
                }
                _ => Err(failed()),
            }
        }
        AuthMethod::ScramSha256 => {
            let (verifier, known) = match secret {
                Some(Secret::Scram(v)) => (v, true),
                _ => (&credentials.decoy, false),
            };
            send(
                stream,
                Authentication::SASL(vec!["SCRAM-SHA-256".to_string()]),
            )
            .await?;
            let PasswordMessageFamily::Raw(body) = read_password_message(stream).await? else {
                return Err(protocol_violation("expected a SASLInitialResponse message"));
            };
            let (mechanism, client_first) = sasl_initial_response(&body)
                .ok_or_else(|| protocol_violation("malformed SASLInitialResponse message"))?;
            if mechanism != b"SCRAM-SHA-256" {
                return Err(StartupError::Denied(PgError::fatal(
                    "28000",
                    format!(
                        "SASL mechanism {:?} is not supported; use SCRAM-SHA-256",
                        String::from_utf8_lossy(mechanism)
                    ),
                )));
            }
            let client_first = Bytes::copy_from_slice(client_first);
            let scram = ScramServerAuth::new();
            let (server_first, waiting) = scram
                .on_client_first_message_with_secret(&client_first, verifier.secret())
                .map_err(|e| protocol_violation(&format!("malformed SCRAM message: {e}")))?;
            let server_first_sent = server_first.clone();
            send(
                stream,
                Authentication::SASLContinue(Bytes::from(server_first)),
            )
            .await?;
            let response = read_password_message(stream)
                .await?
                .into_sasl_response()
                .map_err(|_| protocol_violation("expected a SASLResponse message"))?;
            match waiting.on_client_final_message(&response.data) {
                Ok(server_final) if known => {
                    let proved = learned(&|| {
                        verifier
                            .recover_keys(
                                &client_first,
                                server_first_sent.as_bytes(),
                                &response.data,
                            )
                            .map(LearnedSecret::Scram)
                    });
                    send(stream, Authentication::SASLFinal(Bytes::from(server_final))).await?;
                    Ok(proved)
                }
                _ => Err(failed()),
            }
        }
    }
}

/// A SASLInitialResponse body: the mechanism's name, then the length of the initial client response (-1 for
/// none) and the response. Decoded here with every length checked: pgwire's decoder trusts them (found by
/// the `startup` fuzz target).
fn sasl_initial_response(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mechanism, rest) = protocol::cstr(body)?;
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = match len {
        -1 => &[][..],
        len => rest.get(4..4 + usize::try_from(len).ok()?)?,
    };
    Some((mechanism, data))
}

fn protocol_violation(message: &str) -> StartupError {
    StartupError::Refused(PgError::fatal("08P01", message.to_string()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    message: Authentication,
) -> Result<(), StartupError> {
    let mut out = BytesMut::new();
    message.encode(&mut out).map_err(|e| {
        StartupError::Refused(PgError::fatal(
            "XX000",
            format!("encoding authentication: {e}"),
        ))
    })?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads one 'p' message (password, SASLInitialResponse, SASLResponse).
async fn read_password_message<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<PasswordMessageFamily, StartupError> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let (tag, len) = match protocol::peek_header(&header) {
        Some(Ok(h)) => h,
        _ => return Err(protocol_violation("invalid message length")),
    };
    if tag == b'X' {
        return Err(StartupError::Disconnected);
    }
    if tag != b'p' {
        return Err(protocol_violation(&format!(
            "expected password response, got message type {}",
            tag as char
        )));
    }
    if len > MAX_STARTUP_PACKET {
        return Err(protocol_violation("password message too long"));
    }
    let mut body = BytesMut::zeroed(len - protocol::HEADER_LEN);
    stream.read_exact(&mut body).await?;
    Ok(PasswordMessageFamily::Raw(body))
}

/// What a server told us while we logged in.
pub struct ServerLogin {
    pub pid: i32,
    pub secret: i32,
    pub parameters: Vec<(String, String)>,
    /// How the server had the gateway authenticate: `trust`, `password`, `md5`, `scram-sha-256` or
    /// `scram-sha-256-plus` (with channel binding).
    pub method: &'static str,
}

/// A server refused or broke the login.
#[derive(Debug, thiserror::Error)]
pub enum ServerLoginError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("server error {code}: {message}")]
    Server { code: String, message: String },
    #[error("{0}")]
    Protocol(String),
}

/// Logs in to a server over `stream` (already connected) and reads until its first ReadyForQuery.
/// `end_point` is the TLS server certificate's hash when the stream is TLS ([`crate::tls::tls_server_end_point`]): SCRAM
/// then binds to the channel when the server offers it (SCRAM-SHA-256-PLUS), as libpq does by default, so that
/// an authentication relayed by someone in the middle fails.
/// `learned`: for a user looked up with `auth_query`, what its last client login proved (used when there is
/// no password).
pub async fn login_to_server<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    read_buf: &mut BytesMut,
    user: &str,
    password: Option<&str>,
    learned: Option<&LearnedSecret>,
    database: &str,
    end_point: Option<Vec<u8>>,
) -> Result<ServerLogin, ServerLoginError> {
    use postgres_protocol::authentication::sasl::{
        ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
    };
    use postgres_protocol::message::backend::Message as Backend;
    use postgres_protocol::message::frontend;

    let mut out = BytesMut::new();
    frontend::startup_message([("user", user), ("database", database)], &mut out)?;
    // Over TLS a write can leave records in rustls's buffer: every write before a read is flushed.
    stream.write_all(&out).await?;
    stream.flush().await?;
    let need_password = || {
        ServerLoginError::Protocol(format!(
            "the server asks a password for {user}, and none is configured"
        ))
    };
    enum Scram {
        Password(ScramSha256),
        Keys(crate::scram::KeyedScramClient),
    }
    let mut scram: Option<Scram> = None;
    let learned_refused = |what: String| {
        ServerLoginError::Protocol(format!(
            "{what} for {user}, a user looked up with auth.query: log in again through the gateway"
        ))
    };
    let mut login = ServerLogin {
        pid: 0,
        secret: 0,
        parameters: Vec::new(),
        method: "trust",
    };
    loop {
        let message = loop {
            if let Some(message) = Backend::parse(read_buf)? {
                break message;
            }
            if stream.read_buf(read_buf).await? == 0 {
                return Err(ServerLoginError::Protocol(
                    "the server closed the connection during login".into(),
                ));
            }
        };
        out.clear();
        match message {
            // A SCRAM login is only done once the server proved itself (RFC 5802): an Ok before its final
            // message could come from anyone in the middle.
            Backend::AuthenticationOk => {
                if matches!(&scram, Some(Scram::Keys(client)) if !client.verified) {
                    return Err(ServerLoginError::Protocol(
                        "the server ended SCRAM without proving it knows the password".into(),
                    ));
                }
            }
            Backend::AuthenticationCleartextPassword => {
                frontend::password_message(
                    password.ok_or_else(need_password)?.as_bytes(),
                    &mut out,
                )?;
                login.method = "password";
            }
            Backend::AuthenticationMd5Password(body) => {
                let hash = match (password, learned) {
                    (Some(password), _) => postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        password.as_bytes(),
                        body.salt(),
                    ),
                    // md5(password + user) is what md5 authentication hashes with the salt.
                    (None, Some(LearnedSecret::Md5(inner))) => {
                        let mut input = inner.as_bytes().to_vec();
                        input.extend_from_slice(&body.salt());
                        format!("md5{:x}", md5::compute(input))
                    }
                    (None, Some(LearnedSecret::Scram(_))) => {
                        return Err(learned_refused(
                            "the server asks md5, and only SCRAM keys are known".into(),
                        ))
                    }
                    (None, None) => return Err(need_password()),
                };
                frontend::password_message(hash.as_bytes(), &mut out)?;
                login.method = "md5";
            }
            Backend::AuthenticationSasl(body) => {
                use fallible_iterator::FallibleIterator;
                let mut mechanisms = body.mechanisms();
                let (mut plain, mut plus) = (false, false);
                while let Some(m) = mechanisms.next()? {
                    plain |= m == SCRAM_SHA_256;
                    plus |= m == SCRAM_SHA_256_PLUS;
                }
                // RFC 5802's gs2 flag: bind when both sides can; "y" (we could, the server did not offer it)
                // lets a server that did offer it detect a downgrade; "n" when the stream is not TLS.
                let (mechanism, binding) = match end_point.clone() {
                    Some(hash) if plus => (
                        SCRAM_SHA_256_PLUS,
                        ChannelBinding::tls_server_end_point(hash),
                    ),
                    Some(_) if plain => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                    None if plain => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                    _ => {
                        return Err(ServerLoginError::Protocol(
                            "the server offers no SASL mechanism we support".into(),
                        ))
                    }
                };
                let client = match (password, learned) {
                    (Some(password), _) => {
                        Scram::Password(ScramSha256::new(password.as_bytes(), binding))
                    }
                    (None, Some(LearnedSecret::Scram(keys))) => {
                        let (header, data) = match (&end_point, mechanism == SCRAM_SHA_256_PLUS) {
                            (Some(hash), true) => ("p=tls-server-end-point,,", hash.clone()),
                            (Some(_), false) => ("y,,", Vec::new()),
                            (None, _) => ("n,,", Vec::new()),
                        };
                        Scram::Keys(crate::scram::KeyedScramClient::new(
                            keys.clone(),
                            header,
                            data,
                        ))
                    }
                    (None, Some(LearnedSecret::Md5(_))) => {
                        return Err(learned_refused(
                            "the server asks SCRAM, and only an md5 hash is known".into(),
                        ))
                    }
                    (None, None) => return Err(need_password()),
                };
                match &client {
                    Scram::Password(c) => {
                        frontend::sasl_initial_response(mechanism, c.message(), &mut out)?
                    }
                    Scram::Keys(c) => {
                        frontend::sasl_initial_response(mechanism, &c.client_first(), &mut out)?
                    }
                }
                login.method = if mechanism == SCRAM_SHA_256_PLUS {
                    "scram-sha-256-plus"
                } else {
                    "scram-sha-256"
                };
                scram = Some(client);
            }
            Backend::AuthenticationSaslContinue(body) => match scram.as_mut() {
                Some(Scram::Password(client)) => {
                    client.update(body.data())?;
                    frontend::sasl_response(client.message(), &mut out)?;
                }
                Some(Scram::Keys(client)) => {
                    let answer = client.client_final(body.data()).map_err(learned_refused)?;
                    frontend::sasl_response(&answer, &mut out)?;
                }
                None => {
                    return Err(ServerLoginError::Protocol(
                        "unexpected SASL continue".into(),
                    ))
                }
            },
            Backend::AuthenticationSaslFinal(body) => match scram.as_mut() {
                Some(Scram::Password(client)) => client.finish(body.data())?,
                Some(Scram::Keys(client)) => client
                    .verify(body.data())
                    .map_err(ServerLoginError::Protocol)?,
                None => return Err(ServerLoginError::Protocol("unexpected SASL final".into())),
            },
            Backend::ParameterStatus(body) => {
                login
                    .parameters
                    .push((body.name()?.to_string(), body.value()?.to_string()));
            }
            Backend::BackendKeyData(body) => {
                login.pid = body.process_id();
                login.secret = body.secret_key();
            }
            Backend::ReadyForQuery(_) => return Ok(login),
            Backend::ErrorResponse(body) => {
                use fallible_iterator::FallibleIterator;
                let mut fields = body.fields();
                let (mut code, mut message) = (String::new(), String::new());
                while let Some(field) = fields.next()? {
                    match field.type_() {
                        b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
                        b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
                        _ => {}
                    }
                }
                return Err(ServerLoginError::Server { code, message });
            }
            Backend::NoticeResponse(_) => {}
            _ => {
                return Err(ServerLoginError::Protocol(
                    "unexpected message during login".into(),
                ))
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            stream.flush().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_initial_responses_with_lying_lengths_are_malformed_not_a_panic() {
        // Found by the `startup` fuzz target: pgwire's decoder split at whatever length the client claimed.
        assert_eq!(
            sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\x03abc"),
            Some((&b"SCRAM-SHA-256"[..], &b"abc"[..]))
        );
        assert_eq!(
            sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xff"),
            Some((&b"SCRAM-SHA-256"[..], &b""[..]))
        );
        for bad in [
            &b"SCRAM-SHA-256\0\x00\x70\x00\x00abc"[..],
            b"SCRAM-SHA-256\0\x00\x00",
            b"SCRAM-SHA-256",
            b"SCRAM-SHA-256\0\xff\xff\xff\xfe",
        ] {
            assert_eq!(sasl_initial_response(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn options_parameter() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB -c x=a\\ b"),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "1MB".into()),
                ("x".into(), "a b".into())
            ]
        );
    }
}
