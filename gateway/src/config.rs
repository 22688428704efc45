//! The gateway's configuration: one YAML file, parsed into typed sections with defaults, then validated.
//!
//! Every section is a serde struct with `deny_unknown_fields`, so a typo is an error that names the key and the
//! line instead of a setting silently ignored. Durations are human strings ("250ms", "5s", "10m"); sizes are
//! bytes or strings with a unit ("64MiB").

pub use regions::config::{duration, Region, Routing, ServerSpec, WhenNoReplicaFits};
pub use regions::ServerUrl;
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to.
    #[serde(default = "default_listen", deserialize_with = "socket_address")]
    pub listen: SocketAddr,
    /// The primary server. Its URL gives host, port and default database; a user and password in it are the
    /// fallback credentials for server connections (see [`User`]).
    pub primary: ServerSpec,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: Limits,
    /// How long a shutdown (SIGTERM, the console's SHUTDOWN) waits for transactions in flight before it cuts
    /// them (57P01, rolled back). SIGINT waits at most 5 s; a second signal cuts at once.
    #[serde(default = "default_shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
    /// Tokio worker threads; 0 means one per core.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// This gateway's name: its row in the heartbeat table, and in logs. Defaults to `regiongate@<listen>`.
    #[serde(default)]
    pub name: Option<String>,
    /// The region this gateway runs in: its replicas are tried first.
    #[serde(default)]
    pub home_region: Option<String>,
    /// Regions and their read replicas.
    #[serde(default)]
    pub regions: Vec<Region>,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub nplus1: NPlusOneConfig,
    #[serde(default)]
    pub batching: BatchingConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    /// TLS from the gateway to the primary and the replicas: pooled and side connections alike.
    #[serde(default)]
    pub server_tls: regions::ServerTls,
    /// Materialized views the gateway creates, refreshes and routes reads of (see the `views` crate).
    #[serde(default)]
    pub views: Vec<views::ViewSpec>,
    /// Where the configuration was read from, for errors found after parsing ([`Config::invalid`]).
    #[serde(skip)]
    source: Source,
}

/// A configuration's file name and text.
#[derive(Clone, Default)]
struct Source {
    origin: String,
    text: Arc<str>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the text: it may hold passwords.
        f.debug_tuple("Source").field(&self.origin).finish()
    }
}

/// Client-facing TLS.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub mode: TlsMode,
    /// Certificate chain (PEM), the server's certificate first.
    #[serde(default)]
    pub cert: Option<std::path::PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Clients asking for TLS are told no (they may continue without it).
    #[default]
    Disable,
    /// TLS for clients that ask for it; plain connections are accepted too.
    Allow,
    /// Only TLS connections; a client that starts without it is refused with 28000.
    Require,
}

/// Insert batching (group commit at the gateway); off until tables are listed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Tables whose single-row autocommit INSERTs are batched: `events` (any schema) or `schema.events`.
    /// Folded to lower case unless written in double quotes, as PostgreSQL folds names.
    #[serde(deserialize_with = "table_names")]
    pub tables: Vec<String>,
    /// Rows per batch at most (and never more than 65535 parameters).
    pub max_rows: usize,
    /// Bytes of row data per batch at most.
    #[serde(deserialize_with = "size")]
    pub max_bytes: usize,
    /// How long a row may wait for its batch to fill while other batches of its kind are committing.
    #[serde(with = "duration")]
    pub max_delay: Duration,
    /// Batches in flight at once per database and user: the size of the primary pool flushes use.
    pub connections: usize,
    /// A row with nothing to batch with (none of its kind queued, no batch of its kind committing) runs on
    /// its client's own connection, as without batching, up to `connections` such rows of a kind at once.
    /// Off: every row is queued.
    pub alone: bool,
    /// Rows queued or in flight over all tables; past it, new inserts wait (backpressure).
    pub max_queued_rows: usize,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            tables: Vec::new(),
            max_rows: 500,
            max_bytes: 1 << 20,
            max_delay: Duration::from_millis(2),
            connections: 4,
            alone: true,
            max_queued_rows: 10_000,
        }
    }
}

fn table_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    Ok(names
        .into_iter()
        .map(|name| {
            name.split('.')
                .map(
                    |part| match part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
                        Some(quoted) => quoted.to_string(),
                        None => part.to_lowercase(),
                    },
                )
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect())
}

/// N+1 detection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NPlusOneConfig {
    pub enabled: bool,
    /// Repetitions of one statement shape, after a parent, that make an episode.
    pub threshold: u32,
    /// The repetitions must fall within this time.
    #[serde(with = "duration")]
    pub window: std::time::Duration,
    /// Show sample values in reports (they may be personal data).
    pub log_parameters: bool,
}

impl Default for NPlusOneConfig {
    fn default() -> Self {
        NPlusOneConfig {
            enabled: true,
            threshold: 5,
            window: std::time::Duration::from_secs(1),
            log_parameters: false,
        }
    }
}

/// Who may open the admin console (database `regiongate`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Users (from `auth.users`) allowed in; others are refused with 42501.
    #[serde(default)]
    pub users: Vec<String>,
}

/// The Prometheus listener.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serves `/metrics`, `/healthz` and `/readyz` over HTTP; off when absent.
    #[serde(default, deserialize_with = "optional_socket_address")]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Requests that take longer are logged at warn, with their statement.
    #[serde(with = "duration")]
    pub slow_statement: std::time::Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            slow_statement: std::time::Duration::from_secs(1),
        }
    }
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}

/// An address to listen on: `127.0.0.1:6432`, `[::1]:6432`, or a host name and port (`localhost:6432`),
/// resolved once, when the configuration is read (the first address the resolver gives).
fn socket_address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    use std::net::ToSocketAddrs;
    match text.to_socket_addrs() {
        Ok(mut addresses) => addresses.next().ok_or_else(|| {
            serde::de::Error::custom(format!("{text:?} resolves to no address"))
        }),
        Err(error) => Err(serde::de::Error::custom(format!(
            "{text:?} is not an address to listen on (host:port, like 127.0.0.1:6432 or localhost:6432): {error}"
        ))),
    }
}

fn optional_socket_address<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    socket_address(d).map(Some)
}

fn default_workers() -> usize {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection is held for one transaction (the default).
    Transaction,
    /// A server connection is held for the client's whole session.
    Session,
}

impl std::fmt::Display for PoolMode {
    /// As the configuration spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Server connections per (server, database, user).
    pub size: usize,
    /// Idle connections kept open and ready.
    pub min_idle: usize,
    #[serde(with = "duration")]
    pub checkout_timeout: Duration,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    #[serde(with = "duration")]
    pub max_lifetime: Duration,
    /// Named prepared statements one server connection may hold before it is retired (replaced by a fresh one).
    pub max_prepared_statements: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            size: 20,
            min_idle: 0,
            checkout_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            max_prepared_statements: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

impl std::fmt::Display for AuthMethod {
    /// As the configuration spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Trust => "trust",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub method: AuthMethod,
    pub users: Vec<User>,
    /// Users not in `users` are looked up on the primary, logged in as this role (its server password from
    /// `users` when it is listed, else the primary URL's), with `query`. Unset: only listed users log in.
    pub query_user: Option<String>,
    /// Returns the user's name and stored password (SCRAM verifier or md5 hash) for `$1`; a SECURITY DEFINER
    /// function lets a role that is not a superuser read them.
    pub query: String,
    /// How long a lookup's answer is used; a reload or `RELOAD USERS` forgets every answer.
    #[serde(with = "duration")]
    pub query_cache_ttl: std::time::Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            method: AuthMethod::ScramSha256,
            users: Vec::new(),
            query_user: None,
            query: "SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into(),
            query_cache_ttl: std::time::Duration::from_secs(60),
        }
    }
}

/// A user clients may log in as.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Plain text, or a SCRAM verifier (`SCRAM-SHA-256$4096:salt$StoredKey:ServerKey`, as in `pg_authid`), or
    /// an md5 hash (`md5` + md5(password + user)). A verifier works only with scram-sha-256 auth, an md5
    /// hash only with md5.
    #[serde(default)]
    pub password: Option<String>,
    /// The role server connections log in as; defaults to `name`.
    #[serde(default)]
    pub server_user: Option<String>,
    /// The password for server connections; defaults to `password` when that is plain text, then to the
    /// password in the primary's URL.
    #[serde(default)]
    pub server_password: Option<String>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("server_user", &self.server_user)
            .finish_non_exhaustive()
    }
}

impl User {
    /// The password if it is given in plain text (not a verifier or hash).
    pub fn plain_password(&self) -> Option<&str> {
        self.password
            .as_deref()
            .filter(|p| !p.starts_with("SCRAM-SHA-256$") && !is_md5_hash(p))
    }
}

pub fn is_md5_hash(password: &str) -> bool {
    password.len() == 35
        && password.starts_with("md5")
        && password[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// The largest message a client may send; a larger one closes the connection with FATAL 08P01.
    #[serde(deserialize_with = "size")]
    pub max_message_size: usize,
    /// Authenticated clients at once; more are refused with 53300 at the end of their login. Read at every
    /// login, so a reload applies to the next one.
    pub max_clients: usize,
    /// Connections still in their startup or authentication at once; more are refused with 53300 before
    /// their startup packet is read. They do not count against `max_clients`.
    pub max_pending_logins: usize,
    /// How long a connection may take to send its startup packet, and then to authenticate.
    #[serde(with = "duration")]
    pub login_timeout: Duration,
    /// Named prepared statements one client may hold; a Parse past it closes the connection with 53400.
    pub max_prepared_statements: usize,
    /// A client that sends nothing for this long while the gateway waits on it is disconnected (57P05 when
    /// idle, 25P03 inside a transaction). 0 turns it off.
    #[serde(with = "duration")]
    pub client_idle_timeout: Duration,
    /// A request (a Query, or the messages up to a Sync) running longer than this is cancelled on its server,
    /// which answers 57014. 0 turns it off; the server's own statement_timeout works as usual.
    #[serde(with = "duration")]
    pub statement_timeout: Duration,
    /// New connections per second over all clients (a burst of one second's worth); more get 53300. 0: no
    /// limit.
    pub connection_rate: u32,
    /// New connections per second from one client address; more get 53300. 0: no limit.
    pub client_connection_rate: u32,
    /// Failed logins of one user from one address within `failed_login_window` after which that user may try
    /// from there once per `failed_login_window / max_failed_logins`, other attempts refused with 28000,
    /// until the window has passed since the last failure. 0: no limit.
    pub max_failed_logins: u32,
    #[serde(with = "duration")]
    pub failed_login_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 64 << 20,
            max_clients: 10_000,
            max_pending_logins: 1_000,
            login_timeout: Duration::from_secs(10),
            max_prepared_statements: 10_000,
            client_idle_timeout: Duration::ZERO,
            statement_timeout: Duration::ZERO,
            connection_rate: 0,
            client_connection_rate: 0,
            max_failed_logins: 10,
            failed_login_window: Duration::from_secs(60),
        }
    }
}

/// A configuration error, with where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // Not `source`: that would make the I/O error a cause too, and it would be printed twice.
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let deserializer = serde_norway::Deserializer::from_str(text);
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().to_string();
            // The YAML library names the path too: say it once.
            let message = message
                .strip_prefix(&format!("{key}: "))
                .map_or(message.clone(), str::to_string);
            ConfigError::Invalid {
                path: origin.to_string(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message,
            }
        })?;
        config.source = Source {
            origin: origin.to_string(),
            text: text.into(),
        };
        views::validate(&config.views).map_err(|(key, message)| config.invalid(&key, message))?;
        config
            .validate()
            .map_err(|(key, message)| config.invalid(key, message))?;
        Ok(config)
    }

    /// The error for a value at `key` that is wrong, naming the file, the key and its line, as validation
    /// does. For what is checked outside this module, where the value is taken into use (a certificate that
    /// does not load).
    pub fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let message = message.into();
        ConfigError::Invalid {
            path: self.source.origin.clone(),
            key: key.to_string(),
            message: match line_of(&self.source.text, key) {
                Some(line) => format!("{message} (line {line})"),
                None => message,
            },
        }
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.pool.size == 0 {
            return Err(("pool.size", "must be at least 1".into()));
        }
        if self.pool.min_idle > self.pool.size {
            return Err((
                "pool.min_idle",
                format!(
                    "{} is more than pool.size ({})",
                    self.pool.min_idle, self.pool.size
                ),
            ));
        }
        if self.pool.checkout_timeout.is_zero() {
            return Err(("pool.checkout_timeout", "must be more than 0".into()));
        }
        if self.limits.max_message_size < 1024 {
            return Err((
                "limits.max_message_size",
                "must be at least 1024 bytes".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for user in &self.auth.users {
            if !seen.insert(user.name.as_str()) {
                return Err((
                    "auth.users",
                    format!("user {:?} is listed twice", user.name),
                ));
            }
            if self.auth.method != AuthMethod::Trust && user.password.is_none() {
                return Err((
                    "auth.users",
                    format!(
                        "user {:?} has no password but auth.method is not trust",
                        user.name
                    ),
                ));
            }
            let password = user.password.as_deref().unwrap_or("");
            if password.starts_with("SCRAM-SHA-256$") {
                if self.auth.method == AuthMethod::Md5 {
                    return Err((
                        "auth.users",
                        format!(
                            "user {:?}: a SCRAM verifier cannot check md5 logins",
                            user.name
                        ),
                    ));
                }
                crate::scram::parse_scram_verifier(password)
                    .map_err(|e| ("auth.users", format!("user {:?}: {e}", user.name)))?;
            }
            if is_md5_hash(password) && self.auth.method == AuthMethod::ScramSha256 {
                return Err((
                    "auth.users",
                    format!(
                        "user {:?}: an md5 hash cannot check SCRAM logins",
                        user.name
                    ),
                ));
            }
        }
        let mut region_names = std::collections::HashSet::new();
        for region in &self.regions {
            if !region_names.insert(region.name.as_str()) {
                return Err((
                    "regions",
                    format!("region {:?} is listed twice", region.name),
                ));
            }
            if region.replicas.contains(&self.primary.url) {
                return Err((
                    "regions",
                    format!("region {:?} lists the primary as a replica", region.name),
                ));
            }
        }
        if let Some(home) = &self.home_region {
            let known = region_names.contains(home.as_str())
                || self.primary.region.as_deref() == Some(home.as_str());
            if !known {
                return Err((
                    "home_region",
                    format!("{home:?} is not a region in `regions` nor the primary's"),
                ));
            }
        }
        if let Some(unknown) = self
            .routing
            .region_order
            .iter()
            .find(|r| !region_names.contains(r.as_str()))
        {
            return Err((
                "routing.region_order",
                format!("{unknown:?} is not a region in `regions`"),
            ));
        }
        self.server_tls.validate()?;
        if self.tls.mode != TlsMode::Disable {
            // Whether the files hold a usable certificate and key is checked where the acceptor is built
            // (`tls::configured_acceptor`), which reports it through `Config::invalid`.
            if self.tls.cert.is_none() || self.tls.key.is_none() {
                return Err((
                    "tls",
                    "tls.mode allow or require needs tls.cert and tls.key".into(),
                ));
            }
        }
        if self.batching.max_rows == 0 {
            return Err(("batching.max_rows", "must be at least 1".into()));
        }
        if self.batching.connections == 0 {
            return Err(("batching.connections", "must be at least 1".into()));
        }
        if self.batching.max_queued_rows < self.batching.max_rows {
            return Err((
                "batching.max_queued_rows",
                "must be at least batching.max_rows".into(),
            ));
        }
        if self.nplus1.threshold < 2 {
            return Err(("nplus1.threshold", "must be at least 2".into()));
        }
        if self.routing.monitor_interval < std::time::Duration::from_millis(10) {
            return Err(("routing.monitor_interval", "must be at least 10ms".into()));
        }
        if let Some(unknown) = self.admin.users.iter().find(|a| self.user(a).is_none()) {
            return Err(("admin.users", format!("{unknown:?} is not in auth.users")));
        }
        if self.auth.query_user.is_some() && !self.auth.query.contains("$1") {
            return Err(("auth.query", "must take the user's name as $1".into()));
        }
        if self.auth.method != AuthMethod::Trust
            && self.auth.users.is_empty()
            && self.auth.query_user.is_none()
        {
            return Err((
                "auth.users",
                "no users: nobody could log in (list users, set auth.query_user, or use method: trust, which with no \
                 users lets in any user the server accepts)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// This gateway's name (heartbeat row, logs).
    pub fn gateway_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("regiongate@{}", self.listen))
    }

    /// The user entry for a login name.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.auth.users.iter().find(|u| u.name == name)
    }
}

/// The 1-based line where the value at a key path (`pool.size`, `views[1].name`) is written, for validation
/// errors. Each part of the path is looked for among the lines of its parent only, so a key written under
/// several parents is found under the right one. A part written in flow style (`{ size: 4 }`, `[a, b]`) is
/// on its parent's line, which is the answer then.
fn line_of(text: &str, key: &str) -> Option<usize> {
    /// A line's content without its indentation and list dashes, and the column where that content starts.
    fn content(line: &str) -> Option<(usize, &str)> {
        let mut column = line.len() - line.trim_start().len();
        let mut rest = line.trim_start();
        while let Some(after) = rest
            .strip_prefix("- ")
            .or_else(|| (rest == "-").then_some(""))
        {
            column += rest.len() - after.trim_start().len();
            rest = after.trim_start();
        }
        (!rest.is_empty() && !rest.starts_with('#') && rest != "---").then_some((column, rest))
    }
    let lines: Vec<&str> = text.lines().collect();
    // The lines of the current node, and the column its own key stands at (children are to its right).
    let (mut from, mut to, mut column) = (0, lines.len(), None::<usize>);
    let mut at = None;
    let parts = key
        .split('.')
        .flat_map(|part| part.split_inclusive('['))
        .map(|part| part.trim_end_matches('['))
        .filter(|part| !part.is_empty());
    for part in parts {
        let inside =
            |l: usize| content(lines[l]).filter(|(c, _)| column.is_none_or(|col| *c > col));
        let found = match part.strip_suffix(']').and_then(|i| i.parse::<usize>().ok()) {
            // The i-th list item: the lines that start with a dash at the list's indentation.
            Some(index) => {
                let dashes: Vec<usize> = (from..to)
                    .filter(|&l| lines[l].trim_start().starts_with('-') && inside(l).is_some())
                    .collect();
                let indent = dashes
                    .iter()
                    .map(|&l| lines[l].len() - lines[l].trim_start().len())
                    .min();
                dashes
                    .into_iter()
                    .filter(|&l| Some(lines[l].len() - lines[l].trim_start().len()) == indent)
                    .nth(index)
                    .map(|l| (l, indent.unwrap_or(0)))
            }
            None => {
                let name = part.trim_matches('"');
                let own = (from..to).filter_map(|l| inside(l).map(|(c, _)| c)).min();
                (from..to)
                    .find(|&l| {
                        inside(l).is_some_and(|(c, rest)| {
                            Some(c) == own
                                && rest
                                    .strip_prefix(name)
                                    .is_some_and(|after| after.trim_start().starts_with(':'))
                        })
                    })
                    .map(|l| (l, own.unwrap_or(0)))
            }
        };
        let Some((line, key_column)) = found else {
            // Written in flow style on the parent's line (or not written at all: a default).
            return at.map(|l: usize| l + 1);
        };
        at = Some(line);
        // The node's lines: up to the next line at its column or to the left of it (for a list item, the
        // next dash at its indentation, whose content stands further right).
        let item = part.ends_with(']');
        let end = (line + 1..to)
            .find(|&l| {
                let indent = lines[l].len() - lines[l].trim_start().len();
                content(lines[l]).is_some_and(|(c, _)| {
                    if item {
                        indent <= key_column
                    } else {
                        c <= key_column
                    }
                })
            })
            .unwrap_or(to);
        // A list item's own keys start on its dash line.
        from = if item { line } else { line + 1 };
        to = end;
        column = Some(key_column);
    }
    at.map(|l| l + 1)
}

/// Sizes: a number of bytes, or a string with a unit (B, kB, KiB, MB, MiB, GB, GiB).
fn size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Bytes(usize),
        Text(String),
    }
    match Form::deserialize(d)? {
        Form::Bytes(n) => Ok(n),
        Form::Text(text) => parse_size(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid size {text:?}; write e.g. 65536 or \"64MiB\""
            ))
        }),
    }
}

pub fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: usize = text[..split].parse().ok()?;
    let unit = text[split..].trim();
    let factor: usize = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" => 1 << 10,
        "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "primary: postgres://postgres@127.0.0.1:5432/app\nauth: { method: trust }\n";

    #[test]
    fn minimal_file_gets_defaults() {
        let config = Config::parse(MINIMAL, "test.yaml").unwrap();
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.pool.mode, PoolMode::Transaction);
        assert_eq!(config.pool.size, 20);
        assert_eq!(config.primary.url.port, 5432);
        assert_eq!(config.primary.url.database.as_deref(), Some("app"));
    }

    #[test]
    fn lines_are_found_under_the_right_parent() {
        let text = "listen: 127.0.0.1:6432\n\
                    pool:\n  size: 4\n\
                    auth: { method: trust }\n\
                    views:\n\
                    \x20 - name: a\n    schedule: every 5m\n\
                    \x20 - name: b   # the second\n\n    schedule: every 1m\n    unique_key: [x]\n\
                    \x20 - { name: c, schedule: every 2m }\n\
                    regions:\n- name: eu\n  replicas: [ 'postgres://r/app' ]\n";
        let line = |key: &str| line_of(text, key);
        assert_eq!(line("listen"), Some(1));
        assert_eq!(line("pool.size"), Some(3));
        assert_eq!(
            line("auth.method"),
            Some(4),
            "flow style: the parent's line"
        );
        assert_eq!(line("views[0].name"), Some(6));
        assert_eq!(line("views[0].schedule"), Some(7));
        assert_eq!(line("views[1].name"), Some(8));
        assert_eq!(line("views[1].schedule"), Some(10));
        assert_eq!(line("views[1].unique_key"), Some(11));
        assert_eq!(line("views[2].schedule"), Some(12));
        assert_eq!(line("regions[0].replicas"), Some(15));
        assert_eq!(line("routing.max_lag"), None);
    }

    #[test]
    fn serde_errors_name_the_key_once() {
        let text = "primary: postgres://h/app\nauth: { method: trust }\npool:\n  size: many\n";
        let error = Config::parse(text, "test").unwrap_err().to_string();
        assert_eq!(error.matches("pool.size").count(), 1, "{error}");
        assert!(error.contains("line 4"), "{error}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text =
            "primary: postgres://h/app\nauth: { method: trust }\npool:\n  size: 4\n  sise: 5\n";
        let error = Config::parse(text, "f.yaml").unwrap_err().to_string();
        assert!(error.contains("pool"), "{error}");
        assert!(error.contains("sise"), "{error}");
        assert!(error.contains("line 5"), "{error}");
    }

    #[test]
    fn bad_duration_is_named() {
        let text = "primary: postgres://h/app\nauth: { method: trust }\npool: { checkout_timeout: soon }\n";
        let error = Config::parse(text, "f.yaml").unwrap_err().to_string();
        assert!(error.contains("pool.checkout_timeout"), "{error}");
        assert!(error.contains("invalid duration"), "{error}");
    }

    #[test]
    fn views_are_parsed_and_checked_with_key_and_line() {
        let text = "primary: postgres://h/app\nauth: { method: trust }\nviews:\n  - name: daily\n    schedule: every 5m\n    unique_key: [day]\n";
        let config = Config::parse(text, "f.yaml").unwrap();
        assert_eq!(config.views[0].max_staleness(), Duration::from_secs(600));
        let bad_schedule = text.replace("every 5m", "every now and then");
        let error = Config::parse(&bad_schedule, "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("views[0].schedule") && error.contains("every now and then"),
            "{error}"
        );
        let bad_key = text.replace("[day]", "[\"day desc\"]");
        let error = Config::parse(&bad_key, "f.yaml").unwrap_err().to_string();
        assert!(
            error.contains("views[0].unique_key") && error.contains("line 6"),
            "{error}"
        );
    }

    #[test]
    fn validation_names_key() {
        let text =
            "primary: postgres://h/app\nauth: { method: trust }\npool: { size: 2, min_idle: 3 }\n";
        let error = Config::parse(text, "f.yaml").unwrap_err().to_string();
        assert!(error.contains("pool.min_idle"), "{error}");
        assert!(error.contains("line 3"), "{error}");
    }

    #[test]
    fn scram_needs_users() {
        let text = "primary: postgres://h/app\n";
        let error = Config::parse(text, "f.yaml").unwrap_err().to_string();
        assert!(error.contains("auth.users"), "{error}");
    }

    #[test]
    fn regions_and_routing() {
        let text = "primary: { url: 'postgres://p/app', region: us-east }\nhome_region: eu-west\nauth: { method: trust }\n\
                    regions:\n  - { name: eu-west, replicas: [ 'postgres://r1/app' ] }\nrouting: { max_lag: 5s, when_no_replica_fits: error }\n";
        let config = Config::parse(text, "f").unwrap();
        assert_eq!(config.routing.max_lag, std::time::Duration::from_secs(5));
        assert_eq!(
            config.routing.when_no_replica_fits,
            WhenNoReplicaFits::Error
        );
        let bad = text.replace("home_region: eu-west", "home_region: mars");
        let error = Config::parse(&bad, "f").unwrap_err().to_string();
        assert!(
            error.contains("home_region") && error.contains("line 2"),
            "{error}"
        );
        let text =
            "primary: { url: 'postgres://h:1/app', region: us-east }\nauth: { method: trust }\n";
        let config = Config::parse(text, "f").unwrap();
        assert_eq!(config.primary.region.as_deref(), Some("us-east"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("2 kB"), Some(2000));
        assert_eq!(parse_size("lots"), None);
    }
}
