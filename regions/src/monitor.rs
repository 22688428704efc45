//! Measuring replicas: the heartbeat on the primary and one probe task per replica, on the gateway's own side
//! connections (tokio-postgres).
//!
//! Every interval the heartbeat writer bumps this gateway's row in `regiongate.heartbeat` and notes, for that
//! heartbeat, the instant it was sent and the primary's WAL position. A probe asks a replica what it has
//! replayed (WAL position and heartbeat). A replica that has replayed heartbeat N (or the WAL position noted
//! with it) shows everything committed before N was sent; that instant is its `fresh_as_of`, so its lag stays
//! right on an idle primary (the heartbeat keeps WAL moving) and is zero once replay catches up.

use crate::lsn::Lsn;
use crate::picture::{self, Node, NodeView, ReplicaId, ReplicaStatus, Role, Writer};
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
    /// The timeline it was written on: positions and sequence numbers compare only within one (after a
    /// failover the new primary's WAL continues below a lost tail of the old one's, and reuses its numbers).
    pub timeline: Option<u32>,
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

    /// The newest instant before which everything is visible on a replica that replayed `lsn` and `seq` on
    /// `timeline` (an unknown timeline matches any).
    pub fn fresh_as_of(
        &self,
        lsn: Option<Lsn>,
        seq: Option<i64>,
        timeline: Option<u32>,
    ) -> Option<Instant> {
        self.0
            .iter()
            .rev()
            .filter(|h| h.timeline.zip(timeline).is_none_or(|(a, b)| a == b))
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
                             WHERE gateway = $1 RETURNING seq, pg_current_wal_lsn()::text, \
                             ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int";

/// What a node is: in recovery or not, how far its WAL goes (replayed on a standby, written on a primary),
/// its timeline (a primary's from the name of its current WAL file; a standby's from its WAL receiver, NULL
/// while that is idle or hidden from a role without pg_read_all_stats), and this gateway's last heartbeat.
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text, \
    CASE WHEN pg_is_in_recovery() THEN (SELECT received_tli FROM pg_stat_wal_receiver)::int \
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
    (SELECT seq FROM regiongate.heartbeat WHERE gateway = $1)";
/// The same before the heartbeat table exists (a gateway started while the primary was down, on a database
/// that never had one): the replayed position alone says how fresh a standby is.
const PROBE_NO_HEARTBEAT_SQL: &str = "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text, \
    CASE WHEN pg_is_in_recovery() THEN (SELECT received_tli FROM pg_stat_wal_receiver)::int \
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
    $1::text IS NULL";

/// The heartbeat connection and the node it writes to.
struct Beating {
    prepared: Prepared,
    url: crate::ServerUrl,
}

/// Writes the heartbeat every interval, on the node that takes writes now, until the gateway stops.
pub(crate) async fn heartbeat(regions: Arc<Regions>) {
    let interval = regions.routing.monitor_interval;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connection: Option<Beating> = None;
    loop {
        ticker.tick().await;
        let Writer::Node { url, .. } = regions.writer() else {
            // No node takes writes: nothing to beat on. The replicas' data ages from their last heartbeat.
            connection = None;
            regions.primary_seen(None);
            crate::metrics::PRIMARY_UP.set(0);
            continue;
        };
        if connection
            .as_ref()
            .is_none_or(|c| c.prepared.client.is_closed() || c.url != url)
        {
            let side = side_connection(
                &url,
                &regions.login,
                "regiongate monitor",
                interval.max(Duration::from_secs(2)),
            );
            let opened = async {
                let client = side.connect().await?;
                setup(&client, &regions.gateway_name).await?;
                let statement = client.prepare(HEARTBEAT_SQL).await?;
                Ok::<_, tokio_postgres::Error>(Prepared { client, statement })
            };
            connection = match opened.await {
                Ok(prepared) => Some(Beating { prepared, url }),
                Err(error) => {
                    regions.primary_failed(&url, &describe(&error));
                    None
                }
            };
        }
        let Some(c) = &connection else { continue };
        let sent = Instant::now();
        let parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&regions.gateway_name];
        let written = c
            .prepared
            .client
            .query_one(&c.prepared.statement, &parameters);
        match tokio::time::timeout(interval * 8, written).await {
            Ok(Ok(row)) => {
                let lsn = row.get::<_, String>(1).parse().unwrap_or_default();
                regions.heartbeat_written(Heartbeat {
                    seq: row.get(0),
                    lsn,
                    timeline: row.get::<_, Option<i32>>(2).map(|t| t as u32),
                    sent,
                });
            }
            Ok(Err(error)) => {
                regions.primary_failed(&c.url, &describe(&error));
                connection = None;
            }
            Err(_) => {
                regions.primary_failed(&c.url, "heartbeat timed out");
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

/// What one probe found.
struct Probed {
    in_recovery: bool,
    lsn: Option<Lsn>,
    timeline: Option<u32>,
    seq: Option<i64>,
}

/// Probes one node every interval. A failed probe is tried again at once on a new connection, and the node
/// is down only when that fails too (a dead server refuses at once; one slow answer does not fail a primary
/// over); while it is down it is tried with a backoff of up to two seconds.
pub(crate) async fn probe(regions: Arc<Regions>, node: Node) {
    let interval = regions.routing.monitor_interval;
    let url = match node {
        Node::Configured => regions.primary_url.clone(),
        Node::Replica(id) => regions.replica_urls[id].clone(),
    };
    let side = side_connection(
        &url,
        &regions.login,
        "regiongate monitor",
        interval.max(Duration::from_secs(1)),
    );
    let mut connection: Option<Prepared> = None;
    let mut backoff = interval;
    let mut retried = false;
    loop {
        if connection.as_ref().is_none_or(|c| c.client.is_closed()) {
            let opened = match prepare(&side, PROBE_SQL).await {
                Err(error)
                    if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
                {
                    prepare(&side, PROBE_NO_HEARTBEAT_SQL).await
                }
                opened => opened,
            };
            match opened {
                Ok(c) => {
                    connection = Some(c);
                    backoff = interval;
                }
                Err(error) => {
                    regions.node_failed(node, &describe(&error), says_down(&error));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        let c = connection.as_ref().expect("connected above");
        let started = Instant::now();
        let timeout = (interval * 4).max(Duration::from_secs(1));
        let parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&regions.gateway_name];
        let probed = c.client.query_one(&c.statement, &parameters);
        let failure = match tokio::time::timeout(timeout, probed).await {
            Ok(Ok(row)) => {
                retried = false;
                let rtt = started.elapsed();
                let probed = Probed {
                    in_recovery: row.get(0),
                    lsn: row.get::<_, Option<String>>(1).and_then(|l| l.parse().ok()),
                    timeline: row.get::<_, Option<i32>>(2).map(|t| t as u32),
                    seq: row.try_get::<_, Option<i64>>(3).ok().flatten(),
                };
                regions.node_measured(node, started, rtt, probed);
                None
            }
            Ok(Err(error)) => Some((describe(&error), says_down(&error))),
            Err(_) => Some((format!("probe timed out after {timeout:?}"), true)),
        };
        if let Some((error, down)) = failure {
            connection = None;
            if !retried {
                retried = true;
                continue;
            }
            regions.node_failed(node, &error, down);
        }
        tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
    }
}

/// Whether a failed probe means the node is down: it did not answer, or answered that it is shutting down or
/// starting up (57P0x). A server that refuses for another reason (too many connections, a password) is up,
/// and keeps the role it last said it had.
fn says_down(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_none_or(|db| {
        let code = db.code().code();
        code.starts_with("57P") || code.starts_with("08")
    })
}

/// The configuration's primary as its probe saw it last.
#[derive(Default)]
pub(crate) struct NodeProbe {
    pub role: Role,
    pub timeline: Option<u32>,
    pub error: Option<String>,
}

/// Where writes go, as last decided.
#[derive(Default)]
pub(crate) struct Writes {
    pub writer: Writer,
    pub epoch: u64,
    /// The newest timeline a primary was seen on: a node on an older one gets no writes.
    pub newest_timeline: u32,
    /// Since when no node took writes, and which one took them last.
    pub unavailable_since: Option<Instant>,
    pub last: Option<(crate::ServerUrl, Option<u32>)>,
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

    fn primary_failed(&self, primary: &crate::ServerUrl, error: &str) {
        self.primary_seen(None);
        crate::metrics::PRIMARY_UP.set(0);
        tracing::warn!(%primary, error, "heartbeat on the primary failed");
    }

    fn node_measured(&self, node: Node, at: Instant, rtt: Duration, probed: Probed) {
        let role = if probed.in_recovery {
            Role::Standby
        } else {
            Role::Primary
        };
        let id = match node {
            Node::Configured => {
                let mut seen = self.configured.lock().unwrap_or_else(|p| p.into_inner());
                if seen.role != role {
                    tracing::info!(node = %self.primary_url, role = role.label(), timeline = probed.timeline, "node role");
                }
                seen.role = role;
                seen.timeline = probed.timeline.or(seen.timeline);
                seen.error = None;
                crate::metrics::node_role(&self.primary_url, role, seen.timeline);
                drop(seen);
                self.decide_writer(&self.statuses.lock().unwrap_or_else(|p| p.into_inner()));
                return;
            }
            Node::Replica(id) => id,
        };
        let (fresh_as_of, latest) = {
            let heartbeats = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
            let timeline = probed
                .timeline
                .or_else(|| self.statuses.lock().unwrap_or_else(|p| p.into_inner())[id].timeline);
            (
                heartbeats.fresh_as_of(probed.lsn, probed.seq, timeline),
                heartbeats.latest(),
            )
        };
        let lsn = probed.lsn.filter(|_| probed.in_recovery);
        self.update(id, |status| {
            let was_down = !status.up;
            if status.role != role {
                tracing::info!(node = %status.url, region = %status.region, role = role.label(), timeline = probed.timeline, "node role");
            }
            status.role = role;
            status.timeline = probed.timeline.or(status.timeline);
            status.up = lsn.is_some();
            status.error = if lsn.is_some() {
                None
            } else {
                Some("out of recovery: this server is a primary, not a replica".into())
            };
            // Smoothed like TCP's SRTT, so one slow probe does not reorder regions.
            status.rtt = Some(match status.rtt {
                Some(previous) => previous.mul_f64(0.8) + rtt.mul_f64(0.2),
                None => rtt,
            });
            status.replay_lsn = lsn;
            status.fresh_as_of = fresh_as_of;
            let caught_up = matches!((lsn, latest), (Some(l), Some(h)) if l >= h.lsn && h.timeline == status.timeline);
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

    fn node_failed(&self, node: Node, error: &str, down: bool) {
        if !down {
            tracing::warn!(node = ?node, error, "a node refused its probe: its role is kept");
            if let Node::Replica(id) = node {
                self.update(id, |status| {
                    status.up = false;
                    status.error = Some(error.to_string());
                });
            }
            return;
        }
        match node {
            Node::Configured => {
                let mut seen = self.configured.lock().unwrap_or_else(|p| p.into_inner());
                if seen.role != Role::Down {
                    tracing::warn!(node = %self.primary_url, error, "the configured primary is down");
                }
                seen.role = Role::Down;
                seen.error = Some(error.to_string());
                crate::metrics::node_role(&self.primary_url, Role::Down, seen.timeline);
                drop(seen);
                self.decide_writer(&self.statuses.lock().unwrap_or_else(|p| p.into_inner()));
            }
            Node::Replica(id) => self.update(id, |status| {
                if status.up || status.error.as_deref() == Some("not measured yet") {
                    tracing::warn!(replica = %status.url, region = %status.region, error, "replica is down");
                }
                status.up = false;
                status.role = Role::Down;
                status.error = Some(error.to_string());
            }),
        }
    }

    /// Changes one replica's status and publishes a new picture.
    pub(crate) fn update(&self, id: ReplicaId, change: impl FnOnce(&mut ReplicaStatus)) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(status) = statuses.get_mut(id) {
            let role = status.role;
            change(status);
            crate::metrics::observe(status);
            if status.role != role {
                crate::metrics::node_role(&status.url, status.role, status.timeline);
                self.decide_writer(&statuses);
                return;
            }
        }
        self.publish(&statuses);
    }

    /// Decides where writes go from every node's last probe, and publishes the picture. A change of writer
    /// is logged: the `failover` event names both nodes and how long writes were unavailable.
    pub(crate) fn decide_writer(&self, statuses: &[ReplicaStatus]) {
        let announce = {
            let configured = self.configured.lock().unwrap_or_else(|p| p.into_inner());
            let mut nodes = vec![NodeView {
                node: Node::Configured,
                url: &self.primary_url,
                region: self.primary_region.as_ref(),
                role: configured.role,
                timeline: configured.timeline,
                error: configured.error.as_deref(),
            }];
            nodes.extend(statuses.iter().map(|s| NodeView {
                node: Node::Replica(s.id),
                url: &s.url,
                region: Some(&s.region),
                role: s.role,
                timeline: s.timeline,
                error: s.error.as_deref(),
            }));
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            // The newest timeline any node reports: in a split brain, or from a standby that followed a
            // newer primary, a node on an older one must not take writes when it is left alone.
            writes.newest_timeline = nodes
                .iter()
                .filter(|n| matches!(n.role, Role::Primary | Role::Standby))
                .filter_map(|n| n.timeline)
                .fold(writes.newest_timeline, u32::max);
            let writer = picture::writer_of(&nodes, writes.newest_timeline);
            let before = writes.writer.url().cloned();
            let after = writer.url().cloned();
            if let Writer::Node {
                timeline: Some(t), ..
            } = &writer
            {
                writes.newest_timeline = writes.newest_timeline.max(*t);
            }
            let changed = before != after || writes.epoch == 0;
            if changed {
                writes.epoch += 1;
                crate::metrics::WRITER_UP.set(i64::from(after.is_some()));
            }
            match (&writer, changed) {
                (Writer::Refused { why }, true) => {
                    writes.unavailable_since.get_or_insert_with(Instant::now);
                    tracing::warn!(reason = %why, "writes unavailable: no node takes them");
                }
                (Writer::Node { url, timeline, .. }, true) => {
                    let unavailable = writes.unavailable_since.take().map(|t| t.elapsed());
                    let unavailable_ms = crate::millis(unavailable.unwrap_or_default());
                    match writes.last.take() {
                        Some((from, from_timeline)) if &from != url => {
                            crate::metrics::FAILOVERS.inc();
                            tracing::warn!(%from, from_timeline, to = %url, to_timeline = timeline, writes_unavailable_ms = unavailable_ms, "failover: writes go to a new primary");
                        }
                        Some(_) => {
                            tracing::info!(primary = %url, timeline, writes_unavailable_ms = unavailable_ms, "the primary takes writes again");
                        }
                        None => tracing::info!(primary = %url, timeline, "primary"),
                    }
                    writes.last = Some((url.clone(), *timeline));
                }
                _ => {}
            }
            if let (true, Some(former)) = (changed, before) {
                self.former_writers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(former);
            }
            let announce = changed.then(|| writer.clone());
            writes.writer = writer;
            announce
        };
        self.publish(statuses);
        // After the picture: whoever acts on the change (retiring the old writer's pools) finds sessions
        // already sent to the new one.
        if let Some(writer) = announce {
            self.writer_changes.send_replace(writer);
        }
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
                timeline: Some(1),
                sent: base + Duration::from_millis(250 * i as u64),
            });
        }
        // Replayed up to LSN 250: heartbeats 0..=2 are visible, so fresh as of heartbeat 2.
        assert_eq!(
            ring.fresh_as_of(Some(Lsn(250)), None, Some(1)),
            Some(base + Duration::from_millis(500))
        );
        // The heartbeat row itself says 3.
        assert_eq!(
            ring.fresh_as_of(Some(Lsn(250)), Some(3), None),
            Some(base + Duration::from_millis(750))
        );
        // Nothing replayed that we remember.
        assert_eq!(ring.fresh_as_of(None, Some(-1), Some(1)), None);
        // A new primary's heartbeats (timeline 2) continue at lower positions: a replica still on timeline
        // 1, whose WAL went further on the old primary, has none of them.
        ring.push(Heartbeat {
            seq: 3,
            lsn: Lsn(320),
            timeline: Some(2),
            sent: base + Duration::from_millis(1250),
        });
        assert_eq!(
            ring.fresh_as_of(Some(Lsn(450)), Some(4), Some(1)),
            Some(base + Duration::from_millis(1000))
        );
        assert_eq!(
            ring.fresh_as_of(Some(Lsn(330)), None, Some(2)),
            Some(base + Duration::from_millis(1250))
        );
    }
}
