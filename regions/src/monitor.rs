//! Measuring replicas: the heartbeat on the primary and one probe task per replica, on the gateway's own side
//! connections (tokio-postgres).
//!
//! Every interval the heartbeat writer bumps this gateway's row in `regiongate.heartbeat` and notes, for that
//! heartbeat, the instant it was sent and the primary's WAL position. A probe asks a replica what it has
//! replayed (WAL position and heartbeat). A replica that has replayed heartbeat N (or the WAL position noted
//! with it) shows everything committed before N was sent; that instant is its `fresh_as_of`, so its lag stays
//! right on an idle primary (the heartbeat keeps WAL moving) and is zero once replay catches up.

use crate::lsn::Lsn;
use crate::picture::{ReplicaId, ReplicaStatus};
use crate::Regions;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Heartbeats remembered (two minutes at the default interval); an older one means "lag unknown".
const HEARTBEATS_KEPT: usize = 512;

/// The heartbeat table on the primary; idempotent, also part of migrations/0001_regiongate.sql.
pub const SCHEMA_SQL: &str = "CREATE SCHEMA IF NOT EXISTS regiongate;
CREATE TABLE IF NOT EXISTS regiongate.heartbeat (
    gateway text PRIMARY KEY,
    seq bigint NOT NULL,
    written_at timestamptz NOT NULL
);";

/// How the gateway logs in for its own work (monitors, heartbeat).
#[derive(Clone, Debug)]
pub struct SideLogin {
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    /// TLS to the servers, as for the pooled connections.
    pub tls: crate::tls::ServerTls,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Heartbeat {
    pub seq: i64,
    pub lsn: Lsn,
    pub sent: Instant,
}

/// Ring of recent heartbeats, oldest first.
#[derive(Default)]
pub(crate) struct Heartbeats(VecDeque<Heartbeat>);

impl Heartbeats {
    pub fn push(&mut self, heartbeat: Heartbeat) {
        if self.0.len() == HEARTBEATS_KEPT {
            self.0.pop_front();
        }
        self.0.push_back(heartbeat);
    }

    pub fn latest(&self) -> Option<Heartbeat> {
        self.0.back().copied()
    }

    /// The newest instant before which everything is visible on a replica that replayed `lsn` and `seq`.
    pub fn fresh_as_of(&self, lsn: Option<Lsn>, seq: Option<i64>) -> Option<Instant> {
        self.0
            .iter()
            .rev()
            .find(|h| lsn.is_some_and(|l| l >= h.lsn) || seq.is_some_and(|s| s >= h.seq))
            .map(|h| h.sent)
    }
}

/// How a side connection to a server is opened: tokio-postgres settings and the TLS connector for them.
#[derive(Clone)]
pub struct SideConnect {
    pub config: tokio_postgres::Config,
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
}

impl SideConnect {
    /// Connects, and drives the connection on its own task until the client is dropped.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

/// Connection settings for the gateway's own side connections to a server (monitors, views, migrations).
pub fn side_connection(
    url: &crate::ServerUrl,
    login: &SideLogin,
    application: &str,
    timeout: Duration,
) -> SideConnect {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&url.host)
        .port(url.port)
        .user(&login.user)
        .dbname(&login.database)
        .application_name(application)
        .connect_timeout(timeout)
        .ssl_mode(login.tls.ssl_mode());
    if let Some(password) = &login.password {
        config.password(password);
    }
    // Validation built the TLS configuration already; should it fail now after all (a file changed under a
    // running gateway), the connection is refused when TLS is asked, as it must be.
    let client_config = login
        .tls
        .client_config()
        .unwrap_or_else(|_| crate::tls::refusing_config());
    SideConnect {
        config,
        tls: tokio_postgres_rustls::MakeRustlsConnect::new((*client_config).clone()),
    }
}

/// A side connection with its one statement prepared, so that each measurement is one round trip (a
/// statement sent as text would cost two: Parse/Describe, then Bind/Execute).
struct Prepared {
    client: Client,
    statement: tokio_postgres::Statement,
}

async fn prepare(side: &SideConnect, sql: &str) -> Result<Prepared, tokio_postgres::Error> {
    let client = side.connect().await?;
    let statement = client.prepare(sql).await?;
    Ok(Prepared { client, statement })
}

/// An error as an operator wants to read it: the server's SQLSTATE and message, or the connection failure.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => {
            use std::error::Error;
            match error.source() {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            }
        }
    }
}

const HEARTBEAT_SQL: &str = "UPDATE regiongate.heartbeat SET seq = seq + 1, written_at = now() \
                             WHERE gateway = $1 RETURNING seq, pg_current_wal_lsn()::text";
const PROBE_SQL: &str = "SELECT pg_last_wal_replay_lsn()::text, \
                         (SELECT seq FROM regiongate.heartbeat WHERE gateway = $1)";

/// Writes the heartbeat every interval until the gateway stops.
pub(crate) async fn heartbeat(regions: Arc<Regions>) {
    let interval = regions.routing.monitor_interval;
    let side = side_connection(
        &regions.primary_url,
        &regions.login,
        "regiongate monitor",
        interval.max(Duration::from_secs(2)),
    );
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connection: Option<Prepared> = None;
    loop {
        ticker.tick().await;
        if connection.as_ref().is_none_or(|c| c.client.is_closed()) {
            let opened = async {
                let client = side.connect().await?;
                setup(&client, &regions.gateway_name).await?;
                let statement = client.prepare(HEARTBEAT_SQL).await?;
                Ok::<_, tokio_postgres::Error>(Prepared { client, statement })
            };
            connection = match opened.await {
                Ok(c) => Some(c),
                Err(error) => {
                    regions.primary_failed(&describe(&error));
                    None
                }
            };
        }
        let Some(c) = &connection else { continue };
        let sent = Instant::now();
        let parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&regions.gateway_name];
        let written = c.client.query_one(&c.statement, &parameters);
        match tokio::time::timeout(interval * 8, written).await {
            Ok(Ok(row)) => {
                let lsn = row.get::<_, String>(1).parse().unwrap_or_default();
                regions.heartbeat_written(Heartbeat {
                    seq: row.get(0),
                    lsn,
                    sent,
                });
            }
            Ok(Err(error)) => {
                regions.primary_failed(&describe(&error));
                connection = None;
            }
            Err(_) => {
                regions.primary_failed("heartbeat timed out");
                connection = None;
            }
        }
    }
}

async fn setup(client: &Client, gateway: &str) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(SCHEMA_SQL).await?;
    client
        .execute(
            "INSERT INTO regiongate.heartbeat (gateway, seq, written_at) VALUES ($1, 0, now()) ON CONFLICT DO NOTHING",
            &[&gateway],
        )
        .await?;
    Ok(())
}

/// Probes one replica every interval, reconnecting with backoff while it is down.
pub(crate) async fn probe(regions: Arc<Regions>, id: ReplicaId) {
    let interval = regions.routing.monitor_interval;
    let url = regions.replica_urls[id].clone();
    let side = side_connection(
        &url,
        &regions.login,
        "regiongate monitor",
        interval.max(Duration::from_secs(1)),
    );
    let mut connection: Option<Prepared> = None;
    let mut backoff = interval;
    // The probe reads the heartbeat table, which the heartbeat writer creates: wait for its first beat.
    while regions
        .heartbeats
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .latest()
        .is_none()
    {
        tokio::time::sleep(interval).await;
    }
    loop {
        if connection.as_ref().is_none_or(|c| c.client.is_closed()) {
            match prepare(&side, PROBE_SQL).await {
                Ok(c) => {
                    connection = Some(c);
                    backoff = interval;
                }
                Err(error) => {
                    regions.replica_failed(id, &describe(&error));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let c = connection.as_ref().expect("connected above");
        let started = Instant::now();
        let timeout = (interval * 4).max(Duration::from_secs(1));
        let parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&regions.gateway_name];
        let probed = c.client.query_one(&c.statement, &parameters);
        match tokio::time::timeout(timeout, probed).await {
            Ok(Ok(row)) => {
                let rtt = started.elapsed();
                let lsn = row.get::<_, Option<String>>(0).and_then(|l| l.parse().ok());
                let seq = row.get::<_, Option<i64>>(1);
                regions.replica_measured(id, started, rtt, lsn, seq);
            }
            Ok(Err(error)) => {
                regions.replica_failed(id, &describe(&error));
                connection = None;
            }
            Err(_) => {
                regions.replica_failed(id, &format!("probe timed out after {timeout:?}"));
                connection = None;
            }
        }
        tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
    }
}

impl Regions {
    fn heartbeat_written(&self, heartbeat: Heartbeat) {
        self.primary_seen(Some(heartbeat.sent.elapsed()));
        self.heartbeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(heartbeat);
        crate::metrics::PRIMARY_UP.set(1);
    }

    fn primary_failed(&self, error: &str) {
        self.primary_seen(None);
        crate::metrics::PRIMARY_UP.set(0);
        tracing::warn!(primary = %self.primary_url, error, "heartbeat on the primary failed");
    }

    fn replica_measured(
        &self,
        id: ReplicaId,
        at: Instant,
        rtt: Duration,
        lsn: Option<Lsn>,
        seq: Option<i64>,
    ) {
        let (fresh_as_of, latest) = {
            let heartbeats = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
            (heartbeats.fresh_as_of(lsn, seq), heartbeats.latest())
        };
        self.update(id, |status| {
            let was_down = !status.up;
            status.up = lsn.is_some();
            status.error = if lsn.is_some() {
                None
            } else {
                Some("not in recovery: this server is not a replica".into())
            };
            // Smoothed like TCP's SRTT, so one slow probe does not reorder regions.
            status.rtt = Some(match status.rtt {
                Some(previous) => previous.mul_f64(0.8) + rtt.mul_f64(0.2),
                None => rtt,
            });
            status.replay_lsn = lsn;
            status.fresh_as_of = fresh_as_of;
            let caught_up = matches!((lsn, latest), (Some(l), Some(h)) if l >= h.lsn);
            status.lag = if caught_up {
                Some(Duration::ZERO)
            } else {
                fresh_as_of.map(|t| at.saturating_duration_since(t))
            };
            status.lag_bytes = match (lsn, latest) {
                (Some(l), Some(h)) => Some(l.bytes_until(h.lsn)),
                _ => None,
            };
            if was_down && status.up {
                tracing::info!(replica = %status.url, region = %status.region, "replica is up");
            }
        });
    }

    fn replica_failed(&self, id: ReplicaId, error: &str) {
        self.update(id, |status| {
            if status.up || status.error.as_deref() == Some("not measured yet") {
                tracing::warn!(replica = %status.url, region = %status.region, error, "replica is down");
            }
            status.up = false;
            status.error = Some(error.to_string());
        });
    }

    /// Changes one replica's status and publishes a new picture.
    pub(crate) fn update(&self, id: ReplicaId, change: impl FnOnce(&mut ReplicaStatus)) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(status) = statuses.get_mut(id) {
            change(status);
            crate::metrics::observe(status);
        }
        self.publish(&statuses);
    }

    /// The heartbeat answered in `rtt`, or failed (None): the primary's part of the picture.
    fn primary_seen(&self, rtt: Option<Duration>) {
        {
            let mut seen = self.primary_seen.lock().unwrap_or_else(|p| p.into_inner());
            let smoothed = match (rtt, seen.1) {
                (Some(rtt), Some(previous)) => Some(previous.mul_f64(0.8) + rtt.mul_f64(0.2)),
                (rtt, previous) => rtt.or(previous),
            };
            *seen = (rtt.is_some(), smoothed);
        }
        if self.routing.primary_reads != crate::config::PrimaryReads::Never {
            self.publish(&self.statuses.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_from_replayed_position_or_heartbeat() {
        let base = Instant::now();
        let mut ring = Heartbeats::default();
        for i in 0..5 {
            ring.push(Heartbeat {
                seq: i,
                lsn: Lsn(100 * i as u64),
                sent: base + Duration::from_millis(250 * i as u64),
            });
        }
        // Replayed up to LSN 250: heartbeats 0..=2 are visible, so fresh as of heartbeat 2.
        assert_eq!(
            ring.fresh_as_of(Some(Lsn(250)), None),
            Some(base + Duration::from_millis(500))
        );
        // The heartbeat row itself says 3.
        assert_eq!(
            ring.fresh_as_of(Some(Lsn(250)), Some(3)),
            Some(base + Duration::from_millis(750))
        );
        // Nothing replayed that we remember.
        assert_eq!(ring.fresh_as_of(None, Some(-1)), None);
    }
}
