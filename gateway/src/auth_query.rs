//! Users without a list (`auth.query_user`, PgBouncer's `auth_query`): a client whose user is not in
//! `auth.users` is looked up on the primary with `auth.query`, which returns the user's name and password as
//! PostgreSQL stores it (a SCRAM verifier or an md5 hash). The login is checked against that, and the answer
//! is cached for `auth.query_cache_ttl`.
//!
//! The gateway never learns such a user's password, so its server connections log in with what the client's
//! login proved: the SCRAM ClientKey (recovered from the proof, as PgBouncer does), or the md5 hash. Both are
//! kept per user, outside the cache and across reloads, so that every pool of the user (primary and replicas)
//! logs in with the latest.

use crate::protocol::PgError;
use crate::scram::{parse_scram_verifier, ScramVerifier};
use arc_swap::ArcSwapOption;
use regions::SideConnect;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How server connections log in as a user looked up with `auth.query`, whose password the gateway never
/// sees: what that user's last client login proved.
#[derive(Clone)]
pub enum LearnedSecret {
    /// The ClientKey of a SCRAM login, with its verifier.
    Scram(crate::scram::ScramKeys),
    /// md5(password + user) in hex, as `pg_authid` stores md5 passwords: md5 logins need no more.
    Md5(String),
}

/// What the primary says of a user.
#[derive(Clone)]
pub enum Found {
    Scram(ScramVerifier),
    /// md5(password + user) in hex.
    Md5(String),
    /// No such user, or one without a password this gateway can check (NULL, or another format).
    Nothing,
}

impl Found {
    fn of(password: Option<&str>) -> Found {
        match password {
            Some(p) if p.starts_with("SCRAM-SHA-256$") => {
                parse_scram_verifier(p).map_or(Found::Nothing, Found::Scram)
            }
            Some(p) if crate::config::is_md5_hash(p) => Found::Md5(p[3..].to_string()),
            _ => Found::Nothing,
        }
    }
}

/// The lookup of one configuration: its query, its connection to the primary, and the cache.
pub struct AuthQuery {
    query: String,
    connect: SideConnect,
    /// One connection, opened on first use and again after it breaks; lookups take turns on it.
    client: tokio::sync::Mutex<Option<(tokio_postgres::Client, tokio_postgres::Statement)>>,
    cache: moka::sync::Cache<String, Found>,
}

impl AuthQuery {
    /// The lookup `config` asks for, if any: logged in to the primary as `auth.query_user`, with its server
    /// password from `auth.users` when it is listed there, else the primary URL's.
    pub fn from_config(config: &crate::config::Config) -> Option<AuthQuery> {
        let user = config.auth.query_user.clone()?;
        let entry = config.user(&user);
        let login = regions::SideLogin {
            password: entry
                .and_then(|u| {
                    u.server_password
                        .clone()
                        .or_else(|| u.plain_password().map(str::to_string))
                })
                .or_else(|| config.primary.url.password.clone()),
            user: entry.and_then(|u| u.server_user.clone()).unwrap_or(user),
            database: config
                .primary
                .url
                .database
                .clone()
                .unwrap_or_else(|| "postgres".to_string()),
            tls: config.server_tls.clone(),
        };
        let connect = regions::monitor::side_connection(
            &config.primary.url,
            &login,
            "regiongate auth_query",
            Duration::from_secs(5),
        );
        Some(AuthQuery::new(
            &config.auth.query,
            connect,
            config.auth.query_cache_ttl,
        ))
    }

    pub fn new(query: &str, connect: SideConnect, ttl: Duration) -> AuthQuery {
        AuthQuery {
            query: query.to_string(),
            connect,
            client: tokio::sync::Mutex::new(None),
            cache: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// What the primary says of `user`, from the cache when it was asked within the TTL. Users that do not
    /// exist are not cached: a user created a moment later logs in at once (failed logins are limited by
    /// `limits.max_failed_logins` instead).
    pub async fn lookup(&self, user: &str) -> Result<Found, PgError> {
        if let Some(found) = self.cache.get(user) {
            return Ok(found);
        }
        let started = std::time::Instant::now();
        let found = self.ask(user).await.map_err(|e| {
            tracing::warn!(user, error = %e, "auth.query failed on the primary");
            // The cause is for the log: the client has not logged in yet.
            PgError::fatal(
                "08006",
                format!("regiongate: cannot look up user \"{user}\" on the primary now; try again later"),
            )
        })?;
        tracing::debug!(
            user,
            found = !matches!(found, Found::Nothing),
            took_ms = started.elapsed().as_millis() as u64,
            "auth.query lookup"
        );
        if !matches!(found, Found::Nothing) {
            self.cache.insert(user.to_string(), found.clone());
        }
        Ok(found)
    }

    async fn ask(&self, user: &str) -> Result<Found, tokio_postgres::Error> {
        let mut client = self.client.lock().await;
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            let connection = self.connect.connect().await?;
            let statement = connection.prepare(&self.query).await?;
            *client = Some((connection, statement));
        }
        let (connection, statement) = client.as_ref().expect("opened above");
        let row = match connection.query_opt(statement, &[&user]).await {
            Ok(row) => row,
            Err(error) => {
                *client = None;
                return Err(error);
            }
        };
        // The first column names the user (PgBouncer's convention); the second is the password.
        Ok(row.map_or(Found::Nothing, |row| {
            Found::of(row.try_get::<_, Option<&str>>(1).ok().flatten())
        }))
    }

    /// Forgets every answer (`RELOAD USERS`).
    pub fn forget(&self) {
        self.cache.invalidate_all();
    }
}

/// What server connections of looked-up users log in with, per user: shared by every pool of the user.
#[derive(Default)]
pub struct LearnedSecrets(Mutex<HashMap<String, Arc<ArcSwapOption<LearnedSecret>>>>);

impl LearnedSecrets {
    /// The user's slot, made empty on first use.
    pub fn of(&self, user: &str) -> Arc<ArcSwapOption<LearnedSecret>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(user.to_string())
            .or_default()
            .clone()
    }

    /// Forgets what every user's logins proved (the auth method changed): their pools keep their slots,
    /// empty until a client logs in again.
    pub fn forget_all(&self) {
        for slot in self.0.lock().unwrap_or_else(|p| p.into_inner()).values() {
            slot.store(None);
        }
    }

    /// A client of `user` logged in and proved this.
    pub fn learn(&self, user: &str, secret: LearnedSecret) {
        self.of(user).store(Some(Arc::new(secret)));
    }
}
