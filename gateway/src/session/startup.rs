//! A client's way in: its first packets (a CancelRequest, TLS), authentication, the admin console, and the
//! login state it starts its session with.

use super::duplex::Duplex;
use super::routing::Reads;
use super::state::ProtocolState;
use super::statements::Statements;
use super::{observe, settings, shutdown, Session};
use crate::auth::{authenticate_client, read_first_packet, FirstPacket, Startup, StartupError};
use crate::clients::{ClientHandle, ClientInfo};
use crate::config::{PoolMode, TlsMode};
use crate::metrics::METRICS;
use crate::pool::{Lease, LoginState, Pool};
use crate::protocol::{self, PgError, TxStatus};
use crate::tls::Stream;
use crate::Shared;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// An authenticated client of a database, ready for its session.
pub struct LoggedIn {
    pub startup: Startup,
    pub client: Stream,
    /// The primary's pool for its database and user.
    pub pool: Arc<Pool>,
    /// Its startup parameters as the server takes them.
    pub login: Arc<LoginState>,
    /// Session pool mode: the client's own server connection, held from now on.
    pub lease: Option<Lease>,
    pub handle: ClientHandle,
    /// AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery: sent once the session is set up.
    pub hello: BytesMut,
}

/// Takes a new connection through startup and authentication. None when it went no further (refused, a
/// cancel request, the admin console, a client that went quiet): whatever it was owed was sent.
pub async fn log_in(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    live: &mut crate::drain::Live<'_>,
    pending: crate::limits::PendingLogin<'_>,
) -> Option<LoggedIn> {
    let _ = tcp.set_nodelay(true);
    let login_timeout = shared.config.load().limits.login_timeout;
    let (startup, mut client) =
        match tokio::time::timeout(login_timeout, first_packet(shared, tcp)).await {
            Ok(Ok(Some(pair))) => pair,
            Ok(Ok(None)) => return None,
            Ok(Err((client, error))) => return refuse(client, error).await,
            Err(_) => return None, // the client went quiet during startup: nothing to tell it
        };
    let mode = shared.config.load().tls.mode;
    if mode == TlsMode::Require && !client.is_tls() {
        let error = PgError::fatal(
            "28000",
            "regiongate requires TLS (tls.mode: require): connect with sslmode=require or stricter",
        );
        return refuse(client, StartupError::Refused(error)).await;
    }
    let limits = shared.config.load().limits.clone();
    if let Err(error) = shared
        .admission
        .login_allowed(peer.ip(), &startup.user, &limits)
    {
        tracing::warn!(client = %peer, user = %startup.user, "login refused: too many failed logins of this user from this address");
        return refuse(client, StartupError::Refused(error)).await;
    }
    let credentials = shared.credentials.load_full();
    let auth = authenticate_client(&mut client, &credentials, &startup);
    match tokio::time::timeout(login_timeout, auth).await {
        Ok(Ok(learned)) => {
            shared.admission.login_succeeded(peer.ip(), &startup.user);
            if let Some(learned) = learned {
                shared.learned_secrets.learn(&startup.user, learned);
            }
        }
        Ok(Err(error)) => {
            if let Some(e) = error.error() {
                // The message names the user, never a password or proof.
                tracing::warn!(client = %peer, user = %startup.user, code = %e.code, reason = %e.message, "login refused");
            }
            if let StartupError::Denied(_) = error {
                shared
                    .admission
                    .login_failed(peer.ip(), &startup.user, &limits);
            }
            return refuse(client, error).await;
        }
        Err(_) => {
            let error = PgError::fatal("08P01", "authentication timed out");
            return refuse(client, StartupError::Refused(error)).await;
        }
    }
    drop(pending);
    if startup.database == crate::admin::DATABASE {
        live.release();
        admin_session(shared.clone(), client, peer, &startup).await;
        return None;
    }
    // Checked before any server work, and again, atomically, when the client is registered.
    if shared.clients.count() >= limits.max_clients {
        return refuse(client, StartupError::Refused(too_many_clients(&limits))).await;
    }
    let startup_parameters: Vec<(String, String)> = startup
        .parameters
        .iter()
        .chain(startup.options.iter())
        .cloned()
        .collect();
    let (pool, login) = shared.login(&startup, &startup_parameters).await;
    let login = match login {
        Ok(login) => login,
        Err(mut error) => {
            error.severity = "FATAL";
            tracing::info!(client = %peer, user = %startup.user, code = %error.code, reason = %error.message, "login refused by the server");
            return refuse(client, StartupError::Refused(error)).await;
        }
    };
    // Session mode is one client, one backend, from the start: the client gets the backend's own pid (with a
    // secret of the gateway's), so that pg_terminate_backend, NOTIFY's sender pid and the like match.
    let lease = if pool.config().mode == PoolMode::Session {
        // The session's one backend is on the primary: none while no node takes writes (the configured
        // primary may be a split-brained or stale server).
        if let regions::Writer::Refused { why } = shared.regions().writer() {
            let error = PgError::fatal("57P03", format!("regiongate: {why}"));
            return refuse(client, StartupError::Refused(error)).await;
        }
        match pool.checkout().await {
            Ok(lease) => Some(lease),
            Err(error) => {
                let mut error = error.to_client();
                error.severity = "FATAL";
                return refuse(client, StartupError::Refused(error)).await;
            }
        }
    } else {
        None
    };
    let backend_pid = lease.as_ref().map(|lease| lease.pid());
    let max_clients = shared.config.load().limits.max_clients;
    let registered = shared.clients.register(
        backend_pid,
        ClientInfo {
            addr: peer,
            user: startup.user.clone(),
            database: startup.database.clone(),
            application_name: startup
                .parameters
                .iter()
                .find(|(k, _)| k == "application_name")
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
        },
        max_clients,
    );
    let Some(handle) = registered else {
        let limits = shared.config.load();
        return refuse(
            client,
            StartupError::Refused(too_many_clients(&limits.limits)),
        )
        .await;
    };
    let mut hello = BytesMut::with_capacity(login.parameter_status.len() + 32);
    protocol::authentication_ok(&mut hello);
    // As the server reported them with the client's parameters applied (`iso,dmy` is `ISO, DMY`).
    hello.extend_from_slice(&login.parameter_status);
    protocol::backend_key_data(&mut hello, handle.pid, handle.secret);
    protocol::ready_for_query(&mut hello, TxStatus::Idle);
    Some(LoggedIn {
        startup,
        client,
        pool,
        login,
        lease,
        handle,
        hello,
    })
}

/// The client's first packets: the StartupMessage (with the stream, upgraded to TLS if the client asked and
/// TLS is configured), or None after a CancelRequest was handled.
async fn first_packet(
    shared: &Shared,
    tcp: TcpStream,
) -> Result<Option<(Startup, Stream)>, (Stream, StartupError)> {
    let acceptor = shared.tls.load_full();
    let mut client = Stream::Plain(tcp);
    let offer_tls = acceptor.is_some() && shared.config.load().tls.mode != TlsMode::Disable;
    let mut first = read_first_packet(&mut client, offer_tls).await;
    if let (Ok(FirstPacket::Tls), Some(acceptor)) = (&first, acceptor.as_ref()) {
        let Stream::Plain(tcp) = client else {
            unreachable!("TLS is offered on plain connections only")
        };
        client = match acceptor.accept(tcp).await {
            Ok(tls) => Stream::Tls(Box::new(tls.into())),
            Err(error) => {
                // No TLS session to send an error over: the client sees its handshake fail.
                tracing::info!(%error, "TLS handshake failed");
                METRICS
                    .clients_refused
                    .with_label_values(&["tls_handshake"])
                    .inc();
                return Ok(None);
            }
        };
        // Offered again only to be refused below, as PostgreSQL refuses a second SSLRequest.
        first = read_first_packet(&mut client, true).await;
    }
    match first {
        Ok(FirstPacket::Startup(startup)) => Ok(Some((startup, client))),
        Ok(FirstPacket::Cancel { pid, secret }) => {
            shared.clients.cancel(pid, secret).await;
            Ok(None)
        }
        Ok(FirstPacket::Tls) => Err((
            client,
            StartupError::Refused(PgError::fatal(
                "0A000",
                "unsupported frontend protocol 1234.5679: server supports 3.0 (an SSLRequest inside TLS)",
            )),
        )),
        Err(error) => Err((client, error)),
    }
}

/// An authenticated client asked for the admin console: admins get it, others a clear refusal.
async fn admin_session(
    shared: Arc<Shared>,
    mut client: Stream,
    peer: SocketAddr,
    startup: &Startup,
) {
    let config = shared.config.load_full();
    if !config.admin.users.contains(&startup.user) {
        tracing::warn!(client = %peer, user = %startup.user, "admin console refused");
        let error = PgError::fatal(
            "42501",
            format!(
                "permission denied: user \"{}\" is not an admin of this gateway (admin.users)",
                startup.user
            ),
        );
        refuse::<()>(client, StartupError::Refused(error)).await;
        return;
    }
    let mut hello = BytesMut::new();
    protocol::authentication_ok(&mut hello);
    for (name, value) in [
        ("server_version", "15.0 (regiongate admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        protocol::parameter_status_message(&mut hello, name.as_bytes(), value.as_bytes());
    }
    protocol::backend_key_data(&mut hello, 0, 0);
    protocol::ready_for_query(&mut hello, TxStatus::Idle);
    if client.write_all(&hello).await.is_ok() && client.flush().await.is_ok() {
        tracing::info!(client = %peer, user = %startup.user, "admin console opened");
        let _listed = shared.consoles.open(peer, &startup.user);
        crate::admin::serve(shared.clone(), client, peer).await;
    }
}

fn too_many_clients(limits: &crate::config::Limits) -> PgError {
    PgError::fatal(
        "53300",
        format!(
            "regiongate: too many clients logged in (limits.max_clients is {})",
            limits.max_clients
        ),
    )
}

/// Tells a client why it is refused (when there is something to tell), and ends its connection.
async fn refuse<T>(mut client: Stream, error: StartupError) -> Option<T> {
    if let Some(error) = error.error() {
        METRICS
            .clients_refused
            .with_label_values(&[&*error.code])
            .inc();
        let mut out = BytesMut::new();
        error.encode(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            client.write_all(&out).await?;
            client.flush().await
        })
        .await;
    }
    None
}

impl Session {
    /// The session of a client that logged in; its server connection (session pool mode), and what the client
    /// is told when the session is ready.
    pub(super) fn new(
        shared: &Arc<Shared>,
        logged_in: LoggedIn,
        peer: SocketAddr,
    ) -> (Session, Option<Lease>, bytes::BytesMut, tracing::Span) {
        let (startup, pool, login) = (logged_in.startup, logged_in.pool, logged_in.login);
        let config = shared.config.load_full();
        let span = tracing::debug_span!("session", client = %peer, user = %startup.user, database = %startup.database);
        span.in_scope(|| tracing::debug!("client logged in"));
        METRICS.client_connections.inc();
        let session = Session {
            shared: shared.clone(),
            io: Duplex::new(logged_in.client),
            state: ProtocolState::default(),
            statements: Statements::new(config.limits.max_prepared_statements),
            settings: settings::Tracker::new(&login.reset),
            observer: observe::Observer::new(config.clone()),
            pinned: (pool.config().mode == PoolMode::Session).then_some("session pool mode"),
            reads: Reads {
                budget: config.routing.budget_for(&startup.user, &startup.database),
                transactions: config
                    .routing
                    .transactions_for(&startup.user, &startup.database),
                ..Reads::default()
            },
            pool_generation: shared.generation(),
            writer_epoch: 0,
            replicas: shared.has_replicas(),
            regions: shared.regions(),
            pool,
            config,
            lease: None,
            route: None,
            handle: logged_in.handle,
            discard_until_sync: None,
            server_fatal: false,
            fatal_forwarded: false,
            batch: None,
            shutdown: shutdown::Shutdown::new(shared.drain.phase(), shared.drain.kills()),
        };
        (session, logged_in.lease, logged_in.hello, span)
    }
}
