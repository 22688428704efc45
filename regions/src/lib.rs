//! Regions, replicas and where a read goes. This crate knows the topology from the configuration, measures
//! replicas (health, round trip, replication lag) on its own side connections, and chooses a server for a
//! read; it knows nothing of client sockets.

pub mod config;
pub mod lsn;
pub mod metrics;
pub mod monitor;
pub mod picture;
pub mod tls;
pub mod url;

pub use crate::lsn::Lsn;
pub use crate::monitor::{SideConnect, SideLogin};
pub use crate::picture::{
    Decision, NoFit, Node, Picture, ReadRequest, Reason, ReplicaId, ReplicaStatus, Role, Target,
    Writer,
};
pub use crate::tls::{ServerTls, ServerTlsMode};
pub use crate::url::ServerUrl;

use crate::config::{Region, Routing, ServerSpec};
use crate::monitor::Heartbeats;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The live state of the topology: what the monitors measured, bans, and queries in flight per replica.
pub struct Regions {
    pub routing: Routing,
    pub primary_url: ServerUrl,
    pub primary_region: Option<Arc<str>>,
    pub home_region: Option<Arc<str>>,
    /// Replica URLs by [`ReplicaId`].
    pub replica_urls: Vec<ServerUrl>,
    /// This gateway's row in the heartbeat table.
    pub gateway_name: String,
    login: SideLogin,
    statuses: Mutex<Vec<ReplicaStatus>>,
    picture: ArcSwap<Picture>,
    /// The published picture's `writer_epoch`, stored after the picture: a session that holds the writer's
    /// pool checks it with one atomic load at each transaction, instead of loading the picture.
    writer_epoch: std::sync::atomic::AtomicU64,
    heartbeats: Mutex<Heartbeats>,
    outstanding: Vec<AtomicU32>,
    /// Consecutive bans per replica, for the doubling ban time.
    strikes: Vec<AtomicU32>,
    /// The primary as its heartbeat sees it: answering, and the smoothed round trip.
    primary_seen: Mutex<(bool, Option<Duration>)>,
    /// The configuration's primary as its probe sees it (replicas' roles are in their statuses).
    configured: Mutex<monitor::NodeProbe>,
    /// Where writes go, and since when they could not go anywhere.
    writes: Mutex<monitor::Writes>,
    /// Each new writer, for those that must act on a change (the gateway retires the old one's pools).
    writer_changes: tokio::sync::watch::Sender<Writer>,
    /// Every node that stopped taking writes, until taken: a watch keeps only the latest writer, and two
    /// changes in a row (A, then B, then A) must still retire B.
    former_writers: Mutex<Vec<ServerUrl>>,
}

impl Regions {
    pub fn new(
        primary: &ServerSpec,
        home_region: Option<&str>,
        regions: &[Region],
        routing: &Routing,
        gateway_name: &str,
        login: SideLogin,
    ) -> Arc<Regions> {
        let mut statuses = Vec::new();
        for region in regions {
            let name: Arc<str> = region.name.as_str().into();
            for url in &region.replicas {
                statuses.push(ReplicaStatus::new(
                    statuses.len(),
                    name.clone(),
                    url.clone(),
                ));
            }
        }
        let regions = Regions {
            routing: routing.clone(),
            primary_url: primary.url.clone(),
            primary_region: primary.region.as_deref().map(Arc::from),
            home_region: home_region.map(Arc::from),
            replica_urls: statuses.iter().map(|s| s.url.clone()).collect(),
            gateway_name: gateway_name.to_string(),
            login,
            outstanding: statuses.iter().map(|_| AtomicU32::new(0)).collect(),
            strikes: statuses.iter().map(|_| AtomicU32::new(0)).collect(),
            picture: ArcSwap::from_pointee(Picture::default()),
            writer_epoch: std::sync::atomic::AtomicU64::new(Picture::default().writer_epoch),
            heartbeats: Mutex::new(Heartbeats::default()),
            primary_seen: Mutex::new((true, None)),
            configured: Mutex::new(monitor::NodeProbe::default()),
            writes: Mutex::new(monitor::Writes::default()),
            writer_changes: tokio::sync::watch::Sender::new(Writer::default()),
            former_writers: Mutex::new(Vec::new()),
            statuses: Mutex::new(statuses),
        };
        // Every node's series from the start (up 0, role unknown), so that alerts see them before a probe.
        for status in regions
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            metrics::observe(status);
            metrics::node_role(&status.url, Role::Unknown, None);
        }
        metrics::node_role(&regions.primary_url, Role::Unknown, None);
        regions.decide_writer(&regions.statuses.lock().unwrap_or_else(|p| p.into_inner()));
        Arc::new(regions)
    }

    /// Publishes the picture of these statuses.
    fn publish(&self, statuses: &[ReplicaStatus]) {
        let (up, rtt) = *self.primary_seen.lock().unwrap_or_else(|p| p.into_inner());
        let (writer, writer_epoch) = {
            let writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            (writes.writer.clone(), writes.epoch)
        };
        // The primary reads in the region of the node that takes writes now.
        let (up, writer_region) = match &writer {
            Writer::Node { region, .. } => (up, region.clone()),
            Writer::Refused { .. } => (false, self.primary_region.clone()),
        };
        let primary_reads = writer_region.as_ref().and_then(|region| {
            let competes = match self.routing.primary_reads {
                config::PrimaryReads::Never => return None,
                config::PrimaryReads::Local if self.home_region.as_ref() != Some(region) => {
                    return None
                }
                config::PrimaryReads::Local => false,
                config::PrimaryReads::Always => true,
            };
            Some(picture::PrimaryCandidate {
                region: region.clone(),
                up,
                rtt,
                competes,
            })
        });
        let picture = Picture {
            region_order: picture::region_order(
                statuses,
                primary_reads.as_ref(),
                &self.routing.region_order,
                self.home_region.as_deref(),
            ),
            replicas: statuses.to_vec(),
            primary_region: writer_region,
            primary_reads,
            writer,
            writer_epoch,
            configured_primary: {
                let probe = self.configured.lock().unwrap_or_else(|p| p.into_inner());
                (probe.role, probe.timeline)
            },
            outage_max_lag: (self.routing.when_primary_down == config::WhenPrimaryDown::ServeStale)
                .then_some(self.routing.outage_max_lag),
        };
        self.picture.store(Arc::new(picture));
        self.writer_epoch
            .store(writer_epoch, std::sync::atomic::Ordering::Release);
    }

    /// The published picture's `writer_epoch` (see [`Picture::writer_epoch`]); when it differs from the one
    /// a caller saw, [`Regions::picture`] has the new writer.
    #[inline]
    pub fn writer_epoch(&self) -> u64 {
        self.writer_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn has_replicas(&self) -> bool {
        !self.replica_urls.is_empty()
    }

    /// Starts the heartbeat writer and one probe per node (the configuration's primary and each replica);
    /// they run until the runtime stops. Without replicas there is nothing to route or fail over to: the
    /// configured primary takes everything, unprobed.
    pub fn spawn_monitors(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        if !self.has_replicas() {
            return Vec::new();
        }
        let mut tasks = vec![
            tokio::spawn(monitor::heartbeat(self.clone())),
            tokio::spawn(monitor::probe(self.clone(), Node::Configured)),
        ];
        for id in 0..self.replica_urls.len() {
            tasks.push(tokio::spawn(monitor::probe(
                self.clone(),
                Node::Replica(id),
            )));
        }
        tasks
    }

    /// After a reload: what the previous regions learned of the nodes both know (roles, timelines, the newest
    /// primary timeline), so that writes do not go back to the configured primary until its probe answers
    /// (after a failover it may be a stale or split-brained server).
    pub fn inherit(&self, old: &Regions) {
        let old_statuses = old
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (old_role, old_timeline, old_error) = {
            let seen = old.configured.lock().unwrap_or_else(|p| p.into_inner());
            (seen.role, seen.timeline, seen.error.clone())
        };
        {
            // The configured primary as it was seen, as the configured primary or as a replica.
            let mut mine = self.configured.lock().unwrap_or_else(|p| p.into_inner());
            if old.primary_url == self.primary_url {
                (mine.role, mine.timeline, mine.error) = (old_role, old_timeline, old_error);
            } else if let Some(seen) = old_statuses.iter().find(|s| s.url == self.primary_url) {
                (mine.role, mine.timeline, mine.error) =
                    (seen.role, seen.timeline, seen.error.clone());
            }
        }
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        for status in statuses.iter_mut() {
            if let Some(seen) = old_statuses.iter().find(|s| s.url == status.url) {
                (status.role, status.timeline) = (seen.role, seen.timeline);
            } else if status.url == old.primary_url {
                (status.role, status.timeline) = (old_role, old_timeline);
            }
        }
        {
            let old_writes = old.writes.lock().unwrap_or_else(|p| p.into_inner());
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            writes.newest_timeline = old_writes.newest_timeline;
            writes.last = old_writes.last.clone();
            writes.unavailable_since = old_writes.unavailable_since;
        }
        self.decide_writer(&statuses);
    }

    /// Where writes go now.
    pub fn writer(&self) -> Writer {
        self.picture.load().writer.clone()
    }

    /// The nodes that stopped taking writes since the last call.
    pub fn take_former_writers(&self) -> Vec<ServerUrl> {
        std::mem::take(
            &mut *self
                .former_writers
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Each change of [`Regions::writer`].
    pub fn writer_changes(&self) -> tokio::sync::watch::Receiver<Writer> {
        self.writer_changes.subscribe()
    }

    /// The current snapshot.
    pub fn picture(&self) -> arc_swap::Guard<Arc<Picture>> {
        self.picture.load()
    }

    /// Chooses a server for a read.
    pub fn choose(&self, request: &ReadRequest) -> Result<Decision, NoFit> {
        self.choose_with(request, None)
    }

    /// Chooses a server for a read whose freshness `fresh` judges per replica (see [`Picture::choose_with`]).
    pub fn choose_with(
        &self,
        request: &ReadRequest,
        fresh: Option<&dyn Fn(ReplicaId) -> bool>,
    ) -> Result<Decision, NoFit> {
        let fallback = self.routing.when_no_replica_fits == config::WhenNoReplicaFits::Primary;
        self.picture.load().choose_with(
            request,
            Instant::now(),
            |id| self.outstanding[id].load(Ordering::Relaxed),
            fallback,
            fresh,
        )
    }

    /// Counts a query in flight on a replica until the guard drops (load spreading within a region).
    pub fn start_query(self: &Arc<Self>, id: ReplicaId) -> InFlight {
        self.outstanding[id].fetch_add(1, Ordering::Relaxed);
        InFlight {
            regions: self.clone(),
            id,
        }
    }

    /// A replica refused or dropped a connection: no reads for a while, longer each time in a row.
    pub fn ban(&self, id: ReplicaId, reason: &str) {
        let strikes = self.strikes[id].fetch_add(1, Ordering::Relaxed).min(6);
        let duration = self.routing.ban_time * 2u32.pow(strikes);
        self.update(id, |status| {
            status.banned_until = Some(Instant::now() + duration);
            tracing::warn!(replica = %status.url, region = %status.region, reason, ban = ?duration, "replica banned");
        });
    }

    /// BAN from the admin console: no reads until UNBAN.
    pub fn ban_until_unbanned(&self, id: ReplicaId) {
        self.update(id, |status| {
            status.banned_until = Some(Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600));
            tracing::warn!(replica = %status.url, region = %status.region, "replica banned by an operator");
        });
    }

    /// Reads in flight on a replica now.
    pub fn in_flight(&self, id: ReplicaId) -> u32 {
        self.outstanding[id].load(Ordering::Relaxed)
    }

    /// A replica served a read: it is healthy again, so its next ban starts short.
    pub fn served(&self, id: ReplicaId) {
        self.strikes[id].store(0, Ordering::Relaxed);
    }

    /// Lifts a ban now (the admin console's UNBAN).
    pub fn unban(&self, id: ReplicaId) {
        self.strikes[id].store(0, Ordering::Relaxed);
        self.update(id, |status| status.banned_until = None);
    }

    pub fn side_login(&self) -> &SideLogin {
        &self.login
    }

    /// The default time to wait for the monitors' first picture.
    pub fn warmup(&self) -> Duration {
        self.routing.monitor_interval * 4
    }
}

/// A duration as milliseconds with at most three decimals, for log fields (`61.059`, not `61.058983999999995`).
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A read in flight on a replica; see [`Regions::start_query`].
pub struct InFlight {
    regions: Arc<Regions>,
    id: ReplicaId,
}

impl InFlight {
    /// The regions this replica belongs to (a reload may have replaced the current ones since).
    pub fn regions(&self) -> &Arc<Regions> {
        &self.regions
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.regions.outstanding[self.id].fetch_sub(1, Ordering::Relaxed);
    }
}
