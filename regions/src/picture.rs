//! The live picture of the replicas (health, distance, freshness) and the choice of where a read goes.
//!
//! A [`Picture`] is an immutable snapshot: the monitors publish a new one after each measurement, readers load
//! it without locking. [`Picture::choose`] is a pure function of the snapshot, the request and the time, so it
//! is tested without sockets.

use crate::lsn::Lsn;
use crate::url::ServerUrl;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Index of a replica in the configuration (regions in order, replicas in order).
pub type ReplicaId = usize;

/// What a node said it is at its last probe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// Not probed yet.
    #[default]
    Unknown,
    /// Out of recovery: it takes writes.
    Primary,
    /// In recovery: a standby.
    Standby,
    /// It did not answer.
    Down,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Down => "down",
        }
    }
}

/// A configured node: the configuration's `primary`, or a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Configured,
    Replica(ReplicaId),
}

/// Where writes go: the one node out of recovery, or nowhere (the 57P03 message says why).
#[derive(Clone, Debug)]
pub enum Writer {
    Node {
        node: Node,
        url: ServerUrl,
        region: Option<Arc<str>>,
        timeline: Option<u32>,
    },
    Refused {
        why: Arc<str>,
    },
}

impl Default for Writer {
    fn default() -> Self {
        Writer::Refused {
            why: "no primary: not measured yet".into(),
        }
    }
}

impl Writer {
    pub fn url(&self) -> Option<&ServerUrl> {
        match self {
            Writer::Node { url, .. } => Some(url),
            Writer::Refused { .. } => None,
        }
    }
}

/// One node as its probe last saw it, for [`writer_of`].
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    pub node: Node,
    pub url: &'a ServerUrl,
    pub region: Option<&'a Arc<str>>,
    pub role: Role,
    pub timeline: Option<u32>,
    pub error: Option<&'a str>,
}

/// Where writes go: the one node out of recovery. With none, or with two (split brain), or with one on an
/// older timeline than a primary seen before (`newest_timeline`), nowhere: the gateway never guesses. The
/// configuration's primary, until its first probe answers, is taken at its word unless another node says
/// it is the primary.
pub fn writer_of(nodes: &[NodeView], newest_timeline: u32) -> Writer {
    let mut primaries: Vec<&NodeView> = nodes.iter().filter(|n| n.role == Role::Primary).collect();
    if primaries.is_empty() {
        primaries.extend(
            nodes
                .iter()
                .filter(|n| n.node == Node::Configured && n.role == Role::Unknown),
        );
    }
    let timeline = |n: &NodeView| match n.timeline {
        Some(t) => format!("timeline {t}"),
        None => "timeline unknown".to_string(),
    };
    match primaries[..] {
        // Older than a primary seen before, or (after a reload) not yet measured while one was: no writes.
        [one]
            if one.timeline.is_some_and(|t| t < newest_timeline)
                || one.role == Role::Primary && one.timeline.is_none() && newest_timeline > 0 =>
        {
            Writer::Refused {
            why: format!(
                "no primary: {} is out of recovery on {}, older than timeline {newest_timeline} of the last \
                 primary, so it gets no writes",
                one.url,
                timeline(one)
            )
            .into(),
            }
        }
        [one] => Writer::Node {
            node: one.node,
            url: one.url.clone(),
            region: one.region.cloned(),
            timeline: one.timeline,
        },
        [] => {
            let seen: Vec<String> = nodes
                .iter()
                .map(|n| match n.role {
                    Role::Standby => format!("{} is in recovery", n.url),
                    _ => format!("{} is down ({})", n.url, n.error.unwrap_or("not answering")),
                })
                .collect();
            Writer::Refused {
                why: format!("no primary: {}", seen.join("; ")).into(),
            }
        }
        _ => {
            let named: Vec<String> = primaries
                .iter()
                .map(|n| format!("{} ({})", n.url, timeline(n)))
                .collect();
            let all = if named.len() == 2 { "both" } else { "all" };
            Writer::Refused {
                why: format!(
                    "split brain: {} are {all} out of recovery; writes are refused until only one of them is",
                    named.join(" and ")
                )
                .into(),
            }
        }
    }
}

/// What the monitor last learned about one replica.
#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    pub id: ReplicaId,
    pub region: Arc<str>,
    pub url: ServerUrl,
    /// Answered its last probe.
    pub up: bool,
    /// No reads until then (it refused or dropped a connection).
    pub banned_until: Option<Instant>,
    /// Smoothed round-trip time of the probes.
    pub rtt: Option<Duration>,
    /// Every transaction that committed on the primary before this instant is visible on the replica.
    pub fresh_as_of: Option<Instant>,
    pub replay_lsn: Option<Lsn>,
    /// Replication lag as reported: 0 when replay has caught up with the primary, else the age of the newest
    /// heartbeat the replica has replayed.
    pub lag: Option<Duration>,
    /// WAL bytes the replica has yet to replay.
    pub lag_bytes: Option<u64>,
    /// Why it is down, for the console and errors.
    pub error: Option<String>,
    /// What it said it is (a promoted replica is a primary, and no longer serves as a replica).
    pub role: Role,
    /// The timeline it receives (standby) or writes (primary); the last known while its WAL receiver is idle.
    pub timeline: Option<u32>,
}

impl ReplicaStatus {
    pub fn new(id: ReplicaId, region: Arc<str>, url: ServerUrl) -> ReplicaStatus {
        ReplicaStatus {
            id,
            region,
            url,
            up: false,
            banned_until: None,
            rtt: None,
            fresh_as_of: None,
            replay_lsn: None,
            lag: None,
            lag_bytes: None,
            error: Some("not measured yet".into()),
            role: Role::Unknown,
            timeline: None,
        }
    }

    /// The most stale the replica's data can be at `now`.
    pub fn staleness(&self, now: Instant) -> Option<Duration> {
        self.fresh_as_of.map(|t| now.saturating_duration_since(t))
    }

    pub fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|until| until > now)
    }
}

/// A snapshot of every replica, and the order in which regions are tried.
#[derive(Clone, Debug, Default)]
pub struct Picture {
    pub replicas: Vec<ReplicaStatus>,
    /// Nearest region first.
    pub region_order: Vec<Arc<str>>,
    pub primary_region: Option<Arc<str>>,
    /// The primary as a read candidate of its region (`routing.primary_reads`); None where it serves reads
    /// only as the last resort.
    pub primary_reads: Option<PrimaryCandidate>,
    /// Where writes go now.
    pub writer: Writer,
    /// Bumped each time `writer` changes, so that sessions notice with one integer comparison.
    pub writer_epoch: u64,
    /// The configuration's primary, as its probe last saw it.
    pub configured_primary: (Role, Option<u32>),
    /// Reads over their budget while no node takes writes (`routing.when_primary_down`): served from the
    /// freshest replica up to this staleness, or refused when None.
    pub outage_max_lag: Option<Duration>,
}

/// The primary as a read candidate in its own region.
#[derive(Clone, Debug)]
pub struct PrimaryCandidate {
    pub region: Arc<str>,
    /// Its heartbeat answers (until one fails it is assumed up).
    pub up: bool,
    /// Smoothed round trip of the heartbeat.
    pub rtt: Option<Duration>,
    /// `always`: it is chosen over its region's replicas when nearer. `local`: only when none of them fits.
    pub competes: bool,
}

/// What a read needs from a replica.
#[derive(Clone, Copy, Debug)]
pub struct ReadRequest {
    /// The oldest data it accepts.
    pub max_lag: Duration,
    /// Read your writes: the replica must have replayed this position.
    pub min_lsn: Option<Lsn>,
    /// A replica that just failed this very read.
    pub exclude: Option<ReplicaId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica(ReplicaId),
}

/// Why a statement went where it went; a metric label, so the set is fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A write, or a transaction that may write.
    Write,
    /// A `/* regiongate: primary */` hint.
    Hint,
    /// The nearest region had a replica within budget.
    WithinBudget,
    /// The primary served a read in its own region (`routing.primary_reads`).
    PrimaryInRegion,
    /// A nearer replica was over the budget.
    OverBudget,
    /// A nearer replica was down or banned.
    Down,
    /// A nearer replica had not replayed the session's last write.
    ReadYourWrites,
    /// No replicas are configured.
    NoReplicas,
    /// A read of materialized views only, sent to the nearest replica whose copies of them were fresh enough.
    ViewFresh,
    /// Serializable isolation, which a standby refuses (unless READ ONLY DEFERRABLE).
    Serializable,
    /// A transaction that asked for READ WRITE, which a standby refuses to set.
    ReadWrite,
    /// A transaction that may write, with `routing.transactions: primary`.
    Transaction,
    /// A transaction whose first statement began transactions that wrote, recently.
    Predicted,
    /// A transaction that started on a replica and moved to the primary at its first write.
    Moved,
    /// No node takes writes: the freshest replica served a read over its budget (`when_primary_down`).
    PrimaryDown,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Write => "write",
            Reason::Hint => "hint",
            Reason::WithinBudget => "within-budget",
            Reason::PrimaryInRegion => "primary-in-region",
            Reason::OverBudget => "over-budget",
            Reason::Down => "down",
            Reason::ReadYourWrites => "read-your-writes",
            Reason::NoReplicas => "no-replicas",
            Reason::ViewFresh => "view-fresh",
            Reason::Serializable => "serializable",
            Reason::ReadWrite => "read-write",
            Reason::Transaction => "transaction",
            Reason::Predicted => "predicted-write",
            Reason::Moved => "moved",
            Reason::PrimaryDown => "primary-down",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    pub reason: Reason,
    /// The region of the chosen server, if known.
    pub region: Option<Arc<str>>,
    /// For a replica: the instant it goes over the read's budget, as far as the picture knows. The read must
    /// start before then; a caller that waited (for a free server connection, or while one was opened) past it
    /// decides again.
    pub fresh_until: Option<Instant>,
    /// Served over its budget while the primary is down: how stale the replica's data may be.
    pub stale: Option<Duration>,
}

/// No replica fits and the configuration says to refuse: why, per candidate.
#[derive(Clone, Debug)]
pub struct NoFit {
    pub budget: Duration,
    pub candidates: Vec<String>,
    /// No node takes writes, so the primary could not serve it either: why.
    pub no_primary: Option<Arc<str>>,
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no replica within the staleness budget of {:?}",
            self.budget
        )?;
        if self.candidates.is_empty() {
            write!(f, " (no replicas configured)")?;
        } else {
            write!(f, ": {}", self.candidates.join("; "))?;
        }
        match &self.no_primary {
            Some(why) => write!(f, "; and {why}"),
            None => Ok(()),
        }
    }
}

impl Picture {
    /// Where a read goes: the nearest region with a healthy replica fresh enough for the request (within a
    /// region, the one with the fewest queries in flight, then the nearest), else the primary, or `NoFit`
    /// when `fallback_to_primary` is false.
    pub fn choose(
        &self,
        request: &ReadRequest,
        now: Instant,
        outstanding: impl Fn(ReplicaId) -> u32,
        fallback_to_primary: bool,
    ) -> Result<Decision, NoFit> {
        self.choose_with(request, now, outstanding, fallback_to_primary, None)
    }

    /// [`Picture::choose`] where `fresh`, when given, judges each replica's freshness instead of its lag
    /// against `request.max_lag`: reads of materialized views accept a replica whose copies of the views are
    /// recent enough, however far behind it is otherwise. Health, bans and read-your-writes still apply.
    pub fn choose_with(
        &self,
        request: &ReadRequest,
        now: Instant,
        outstanding: impl Fn(ReplicaId) -> u32,
        fallback_to_primary: bool,
        fresh: Option<&dyn Fn(ReplicaId) -> bool>,
    ) -> Result<Decision, NoFit> {
        let fits = if fresh.is_some() {
            Reason::ViewFresh
        } else {
            Reason::WithinBudget
        };
        let mut first_skip: Option<Reason> = None;
        // Some replica was fresh enough but had not replayed the session's last write.
        let mut waits_for_write = false;
        for region in &self.region_order {
            let mut best: Option<(&ReplicaStatus, u32)> = None;
            // The shortest round trip among the region's fitting replicas, for `primary_reads: always`.
            let mut nearest: Option<Duration> = None;
            let mut region_skip = None;
            for replica in self.replicas.iter().filter(|r| &r.region == region) {
                match self.unfit(replica, request, now, fresh) {
                    Some(why) => {
                        waits_for_write |= why == Reason::ReadYourWrites;
                        region_skip.get_or_insert(why);
                    }
                    None => {
                        nearest = match (nearest, replica.rtt) {
                            (Some(n), Some(r)) => Some(n.min(r)),
                            (n, r) => n.or(r),
                        };
                        let load = outstanding(replica.id);
                        let better = match best {
                            None => true,
                            Some((b, b_load)) => (load, replica.rtt) < (b_load, b.rtt),
                        };
                        if better {
                            best = Some((replica, load));
                        }
                    }
                }
            }
            let primary = self
                .primary_reads
                .as_ref()
                .filter(|p| p.up && &p.region == region);
            if let Some(primary) = primary {
                let nearer = match (primary.rtt, nearest) {
                    (Some(p), Some(r)) => p < r,
                    _ => false,
                };
                if best.is_none() || primary.competes && nearer {
                    return Ok(Decision {
                        target: Target::Primary,
                        reason: first_skip.unwrap_or(Reason::PrimaryInRegion),
                        region: Some(region.clone()),
                        fresh_until: None,
                        stale: None,
                    });
                }
            }
            if let Some((replica, _)) = best {
                return Ok(Decision {
                    target: Target::Replica(replica.id),
                    reason: first_skip.unwrap_or(fits),
                    region: Some(region.clone()),
                    // None on overflow (an absurd budget): no instant to miss. For view reads the views'
                    // max_staleness decided, not the lag budget: a wait for a connection (milliseconds against
                    // a staleness of minutes) is not re-checked.
                    fresh_until: if fresh.is_some() {
                        None
                    } else {
                        replica
                            .fresh_as_of
                            .and_then(|t| t.checked_add(request.max_lag))
                    },
                    stale: None,
                });
            }
            if let Some(why) = region_skip {
                first_skip.get_or_insert(why);
            }
        }
        let no_primary = match &self.writer {
            Writer::Refused { why } => Some(why.clone()),
            Writer::Node { .. } => None,
        };
        if no_primary.is_some() && !waits_for_write {
            if let Some(decision) = self.freshest(request, now, fresh) {
                return Ok(decision);
            }
        }
        // The primary has the session's write: a read that only waits for it goes there even where stale
        // reads are refused rather than sent to the primary (`when_no_replica_fits: error`).
        if no_primary.is_none() && (fallback_to_primary || waits_for_write) {
            return Ok(Decision {
                target: Target::Primary,
                reason: first_skip.unwrap_or(Reason::NoReplicas),
                region: self.primary_region.clone(),
                fresh_until: None,
                stale: None,
            });
        }
        Err(NoFit {
            no_primary,
            budget: request.max_lag,
            candidates: self
                .replicas
                .iter()
                .map(|r| {
                    format!(
                        "{} in {}: {}",
                        r.url,
                        r.region,
                        self.describe(r, request, now, fresh)
                    )
                })
                .collect(),
        })
    }

    /// While no node takes writes: the replica with the newest data that is up, has replayed the session's
    /// last write, and is within `outage_max_lag` (None when `when_primary_down: error`).
    fn freshest(
        &self,
        request: &ReadRequest,
        now: Instant,
        fresh: Option<&dyn Fn(ReplicaId) -> bool>,
    ) -> Option<Decision> {
        let most = self.outage_max_lag?;
        let freshest = self
            .replicas
            .iter()
            .filter(|r| {
                matches!(
                    self.unfit(r, request, now, fresh),
                    None | Some(Reason::OverBudget)
                )
            })
            .filter(|r| {
                request
                    .min_lsn
                    .is_none_or(|min| r.replay_lsn.is_some_and(|replayed| replayed >= min))
            })
            .filter_map(|r| r.staleness(now).map(|s| (s, r)))
            .filter(|(staleness, _)| *staleness <= most)
            .min_by_key(|(staleness, r)| (*staleness, r.rtt));
        freshest.map(|(staleness, replica)| Decision {
            target: Target::Replica(replica.id),
            reason: Reason::PrimaryDown,
            region: Some(replica.region.clone()),
            fresh_until: None,
            stale: Some(staleness),
        })
    }

    fn unfit(
        &self,
        replica: &ReplicaStatus,
        request: &ReadRequest,
        now: Instant,
        fresh: Option<&dyn Fn(ReplicaId) -> bool>,
    ) -> Option<Reason> {
        if !replica.up
            || replica.role == Role::Primary
            || replica.banned(now)
            || request.exclude == Some(replica.id)
        {
            return Some(Reason::Down);
        }
        let fresh_enough = match fresh {
            Some(fresh) => fresh(replica.id),
            None => replica
                .staleness(now)
                .is_some_and(|staleness| staleness <= request.max_lag),
        };
        if !fresh_enough {
            return Some(Reason::OverBudget);
        }
        if let Some(min) = request.min_lsn {
            if replica.replay_lsn.is_none_or(|replayed| replayed < min) {
                return Some(Reason::ReadYourWrites);
            }
        }
        None
    }

    fn describe(
        &self,
        replica: &ReplicaStatus,
        request: &ReadRequest,
        now: Instant,
        fresh: Option<&dyn Fn(ReplicaId) -> bool>,
    ) -> String {
        match self.unfit(replica, request, now, fresh) {
            Some(Reason::OverBudget) if fresh.is_some() => {
                "its copy of the views is older than their max_staleness".to_string()
            }
            Some(Reason::Down) => format!(
                "down ({})",
                replica.error.as_deref().unwrap_or(if replica.banned(now) {
                    "banned"
                } else {
                    "excluded"
                })
            ),
            Some(Reason::OverBudget) => match replica.staleness(now) {
                Some(s) => format!("lag {:.3}s", s.as_secs_f64()),
                None => "lag unknown".to_string(),
            },
            Some(Reason::ReadYourWrites) => {
                "has not replayed this session's last write".to_string()
            }
            _ => "fits".to_string(),
        }
    }

    pub fn replica(&self, id: ReplicaId) -> Option<&ReplicaStatus> {
        self.replicas.get(id)
    }
}

/// Regions nearest first: a static order when configured (regions it omits follow), else the home region,
/// then the others by their best measured round trip (unmeasured last). The primary's region is one of them
/// when the primary is a read candidate there.
pub fn region_order(
    replicas: &[ReplicaStatus],
    primary: Option<&PrimaryCandidate>,
    static_order: &[String],
    home: Option<&str>,
) -> Vec<Arc<str>> {
    let mut regions: Vec<Arc<str>> = Vec::new();
    for region in replicas
        .iter()
        .map(|r| &r.region)
        .chain(primary.map(|p| &p.region))
    {
        if !regions.contains(region) {
            regions.push(region.clone());
        }
    }
    let best_rtt = |region: &Arc<str>| {
        let primary = primary
            .filter(|p| &p.region == region && p.up)
            .and_then(|p| p.rtt);
        replicas
            .iter()
            .filter(|r| &r.region == region && r.up)
            .filter_map(|r| r.rtt)
            .chain(primary)
            .min()
            .unwrap_or(Duration::MAX)
    };
    let rank = |region: &Arc<str>| {
        let fixed = static_order
            .iter()
            .position(|s| **s == **region)
            .unwrap_or(usize::MAX);
        let is_home = home == Some(&**region);
        let by_distance = if static_order.is_empty() {
            best_rtt(region)
        } else {
            Duration::MAX
        };
        (fixed, !is_home, by_distance)
    };
    regions.sort_by_key(|r| rank(r));
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: usize, region: &str, rtt_ms: u64, stale_ms: u64, now: Instant) -> ReplicaStatus {
        let mut r = ReplicaStatus::new(
            id,
            region.into(),
            ServerUrl::parse(&format!("postgres://r{id}/app")).unwrap(),
        );
        r.up = true;
        r.error = None;
        r.rtt = Some(Duration::from_millis(rtt_ms));
        r.fresh_as_of = Some(now - Duration::from_millis(stale_ms));
        r.replay_lsn = Some(Lsn(1000));
        r
    }

    fn picture(now: Instant) -> Picture {
        let replicas = vec![
            replica(0, "eu-west", 1, 100, now),
            replica(1, "ap-south", 120, 100, now),
            replica(2, "ap-south", 121, 100, now),
        ];
        Picture {
            region_order: region_order(&replicas, None, &[], Some("eu-west")),
            replicas,
            primary_region: Some("us-east".into()),
            primary_reads: None,
            ..up_primary()
        }
    }

    /// The rest of a picture whose primary takes writes.
    fn up_primary() -> Picture {
        Picture {
            writer: Writer::Node {
                node: Node::Configured,
                url: ServerUrl::parse("postgres://primary/app").unwrap(),
                region: Some("us-east".into()),
                timeline: Some(1),
            },
            outage_max_lag: Some(Duration::from_secs(300)),
            ..Picture::default()
        }
    }

    fn request(max_lag_ms: u64) -> ReadRequest {
        ReadRequest {
            max_lag: Duration::from_millis(max_lag_ms),
            min_lsn: None,
            exclude: None,
        }
    }

    /// The gateway's home is the primary's region, us-east (3 ms), which has a replica 2 ms away that is
    /// 100 ms stale; eu-west's replica is 80 ms away and 10 ms stale.
    fn picture_at_the_primary(now: Instant, competes: bool) -> Picture {
        let replicas = vec![
            replica(0, "us-east", 2, 100, now),
            replica(1, "eu-west", 80, 10, now),
        ];
        let primary = PrimaryCandidate {
            region: "us-east".into(),
            up: true,
            rtt: Some(Duration::from_millis(3)),
            competes,
        };
        Picture {
            region_order: region_order(&replicas, Some(&primary), &[], Some("us-east")),
            replicas,
            primary_region: Some("us-east".into()),
            primary_reads: Some(primary),
            ..up_primary()
        }
    }

    #[test]
    fn the_primary_serves_reads_in_its_region_as_configured() {
        let now = Instant::now();
        let choose = |picture: &Picture, max_lag_ms| {
            let d = picture
                .choose(&request(max_lag_ms), now, |_| 0, false)
                .unwrap();
            (d.target, d.reason, d.region.as_deref().map(str::to_string))
        };
        let us = Some("us-east".to_string());
        // local: the region's replica while it fits; else the primary, before eu-west is tried.
        let local = picture_at_the_primary(now, false);
        assert_eq!(
            choose(&local, 1000),
            (Target::Replica(0), Reason::WithinBudget, us.clone())
        );
        assert_eq!(
            choose(&local, 50),
            (Target::Primary, Reason::PrimaryInRegion, us.clone())
        );
        // always: the nearer of the primary and the region's replicas (here the replica: 2 ms against 3).
        let mut always = picture_at_the_primary(now, true);
        assert_eq!(choose(&always, 1000).0, Target::Replica(0));
        always.primary_reads.as_mut().unwrap().rtt = Some(Duration::from_millis(1));
        assert_eq!(
            choose(&always, 1000),
            (Target::Primary, Reason::PrimaryInRegion, us.clone())
        );
        // A primary whose heartbeat fails is no candidate: the read crosses to eu-west.
        let mut down = picture_at_the_primary(now, false);
        down.primary_reads.as_mut().unwrap().up = false;
        assert_eq!(
            choose(&down, 50),
            (
                Target::Replica(1),
                Reason::OverBudget,
                Some("eu-west".to_string())
            )
        );
        // The primary's region without replicas of its own is in the order, by the primary's round trip.
        let primary = PrimaryCandidate {
            region: "us-east".into(),
            up: true,
            rtt: Some(Duration::from_millis(30)),
            competes: true,
        };
        let replicas = vec![
            replica(0, "eu-west", 80, 100, now),
            replica(1, "ap", 10, 100, now),
        ];
        let order = region_order(&replicas, Some(&primary), &[], None);
        assert_eq!(
            order.iter().map(|r| &**r).collect::<Vec<_>>(),
            ["ap", "us-east", "eu-west"]
        );
    }

    #[test]
    fn with_no_primary_reads_over_budget_go_to_the_freshest_replica_up_to_the_outage_limit() {
        let now = Instant::now();
        let mut p = picture(now);
        p.writer = Writer::Refused {
            why: "no primary: postgres://primary/app is down".into(),
        };
        p.replicas[1].fresh_as_of = Some(now - Duration::from_millis(40));
        // Within budget: as usual, the nearest.
        let d = p.choose(&request(1000), now, |_| 0, true).unwrap();
        assert_eq!(
            (d.target, d.reason, d.stale),
            (Target::Replica(0), Reason::WithinBudget, None)
        );
        // Over budget everywhere: the freshest (ap-south's 40 ms), not the nearest, and how stale it is.
        let d = p.choose(&request(10), now, |_| 0, true).unwrap();
        assert_eq!(
            (d.target, d.reason),
            (Target::Replica(1), Reason::PrimaryDown)
        );
        assert_eq!(d.stale, Some(Duration::from_millis(40)));
        // Staler than the outage limit: refused, saying why the primary could not serve it either.
        p.outage_max_lag = Some(Duration::from_millis(30));
        let no_fit = p.choose(&request(10), now, |_| 0, true).unwrap_err();
        assert!(no_fit.to_string().contains("and no primary: "), "{no_fit}");
        // `when_primary_down: error`.
        p.outage_max_lag = None;
        assert!(p.choose(&request(10), now, |_| 0, true).is_err());
        // A session's write that no replica replayed is never served without it.
        p.outage_max_lag = Some(Duration::from_secs(300));
        let mut read = request(10);
        read.min_lsn = Some(Lsn(2000));
        assert!(p.choose(&read, now, |_| 0, true).is_err());
    }

    #[test]
    fn a_promoted_replica_serves_no_reads_as_a_replica() {
        let now = Instant::now();
        let mut p = picture(now);
        p.replicas[0].role = Role::Primary;
        let d = p.choose(&request(1000), now, |_| 0, true).unwrap();
        assert_eq!(d.target, Target::Replica(1));
    }

    #[test]
    fn writes_go_to_the_one_node_out_of_recovery_and_nowhere_else() {
        let urls: Vec<ServerUrl> = (0..3)
            .map(|i| ServerUrl::parse(&format!("postgres://n{i}/app")).unwrap())
            .collect();
        let view = |i: usize, role: Role, timeline: u32| NodeView {
            node: if i == 0 {
                Node::Configured
            } else {
                Node::Replica(i - 1)
            },
            url: &urls[i],
            region: None,
            role,
            timeline: Some(timeline),
            error: Some("connection refused"),
        };
        let url = |w: &Writer| w.url().map(|u| u.to_string());
        let why = |w: &Writer| match w {
            Writer::Refused { why } => why.to_string(),
            Writer::Node { .. } => String::new(),
        };
        // Before any probe answered, the configuration's primary.
        let w = writer_of(&[view(0, Role::Unknown, 1), view(1, Role::Unknown, 1)], 0);
        assert_eq!(url(&w).as_deref(), Some("n0:5432"));
        // The primary down: nowhere, and why.
        let w = writer_of(&[view(0, Role::Down, 1), view(1, Role::Standby, 1)], 1);
        assert_eq!(
            why(&w),
            "no primary: n0:5432 is down (connection refused); n1:5432 is in recovery"
        );
        // A replica promoted: it takes the writes.
        let w = writer_of(
            &[
                view(0, Role::Down, 1),
                view(1, Role::Primary, 2),
                view(2, Role::Standby, 1),
            ],
            1,
        );
        assert!(matches!(
            w,
            Writer::Node {
                node: Node::Replica(0),
                timeline: Some(2),
                ..
            }
        ));
        // The old primary back on its own: split brain, both named.
        let w = writer_of(&[view(0, Role::Primary, 1), view(1, Role::Primary, 2)], 2);
        assert_eq!(
            why(&w),
            "split brain: n0:5432 (timeline 1) and n1:5432 (timeline 2) are both out of \
             recovery; writes are refused until only one of them is"
        );
        // The new primary gone and the old one alone on its older timeline: still no writes.
        let w = writer_of(&[view(0, Role::Primary, 1), view(1, Role::Down, 2)], 2);
        assert!(why(&w).contains("older than timeline 2"), "{}", why(&w));
        // A node out of recovery whose timeline is not known yet, while a newer one was seen: no writes.
        let mut unknown = view(1, Role::Primary, 2);
        unknown.timeline = None;
        assert!(why(&writer_of(&[view(0, Role::Down, 1), unknown], 2)).contains("no primary"));
        // An unprobed configured primary does not compete with a node that says it is the primary.
        let w = writer_of(&[view(0, Role::Unknown, 1), view(1, Role::Primary, 2)], 0);
        assert_eq!(url(&w).as_deref(), Some("n1:5432"));
    }

    #[test]
    fn nearest_region_within_budget_wins() {
        let now = Instant::now();
        let d = picture(now)
            .choose(&request(1000), now, |_| 0, true)
            .unwrap();
        assert_eq!(
            (d.target, d.reason),
            (Target::Replica(0), Reason::WithinBudget)
        );
    }

    #[test]
    fn over_budget_falls_to_the_next_region_then_the_primary() {
        let now = Instant::now();
        let mut p = picture(now);
        p.replicas[0].fresh_as_of = Some(now - Duration::from_secs(5));
        let d = p.choose(&request(1000), now, |_| 0, true).unwrap();
        assert_eq!(
            (d.region.as_deref(), d.reason),
            (Some("ap-south"), Reason::OverBudget)
        );
        // Least outstanding within the region.
        let d = p
            .choose(&request(1000), now, |id| if id == 1 { 3 } else { 0 }, true)
            .unwrap();
        assert_eq!(d.target, Target::Replica(2));
        for r in &mut p.replicas {
            r.fresh_as_of = Some(now - Duration::from_secs(5));
        }
        let d = p.choose(&request(1000), now, |_| 0, true).unwrap();
        assert_eq!((d.target, d.reason), (Target::Primary, Reason::OverBudget));
        let error = p.choose(&request(1000), now, |_| 0, false).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("1s") && text.contains("lag 5.000s") && text.contains("ap-south"),
            "{text}"
        );
    }

    #[test]
    fn staleness_grows_with_the_age_of_the_measurement() {
        let now = Instant::now();
        let p = picture(now);
        // Fresh as of 100 ms ago; 950 ms later it may be 1.05 s stale.
        let later = now + Duration::from_millis(950);
        let d = p.choose(&request(1000), later, |_| 0, true).unwrap();
        assert_eq!(d.target, Target::Primary);
    }

    #[test]
    fn down_banned_and_excluded_replicas_are_skipped() {
        let now = Instant::now();
        let mut p = picture(now);
        p.replicas[0].up = false;
        let d = p.choose(&request(1000), now, |_| 0, true).unwrap();
        assert_eq!(
            (d.region.as_deref(), d.reason),
            (Some("ap-south"), Reason::Down)
        );
        p.replicas[0].up = true;
        p.replicas[0].banned_until = Some(now + Duration::from_secs(1));
        assert_eq!(
            p.choose(&request(1000), now, |_| 0, true).unwrap().reason,
            Reason::Down
        );
        p.replicas[0].banned_until = None;
        let excluded = ReadRequest {
            exclude: Some(0),
            ..request(1000)
        };
        assert_ne!(
            p.choose(&excluded, now, |_| 0, true).unwrap().target,
            Target::Replica(0)
        );
    }

    #[test]
    fn view_reads_go_to_the_nearest_replica_whose_views_are_fresh_even_when_it_lags() {
        let now = Instant::now();
        let mut p = picture(now);
        // eu-west lags 30 s: far over a 1 s budget for tables.
        p.replicas[0].fresh_as_of = Some(now - Duration::from_secs(30));
        assert_eq!(
            p.choose(&request(1000), now, |_| 0, true)
                .unwrap()
                .region
                .as_deref(),
            Some("ap-south")
        );
        // Its copy of the views is fresh enough: view reads stay in eu-west.
        let fresh = |_: ReplicaId| true;
        let d = p
            .choose_with(&request(1000), now, |_| 0, true, Some(&fresh))
            .unwrap();
        assert_eq!(
            (d.target, d.reason),
            (Target::Replica(0), Reason::ViewFresh)
        );
        // eu-west's copy too old, ap-south's fine: the next region.
        let only_ap = |id: ReplicaId| id != 0;
        let d = p
            .choose_with(&request(1000), now, |_| 0, true, Some(&only_ap))
            .unwrap();
        assert_eq!(
            (d.region.as_deref(), d.reason),
            (Some("ap-south"), Reason::OverBudget)
        );
        // Nowhere fresh enough: the primary (always current), or a refusal that says why.
        let nowhere = |_: ReplicaId| false;
        let d = p
            .choose_with(&request(1000), now, |_| 0, true, Some(&nowhere))
            .unwrap();
        assert_eq!(d.target, Target::Primary);
        let error = p
            .choose_with(&request(1000), now, |_| 0, false, Some(&nowhere))
            .unwrap_err();
        assert!(error.to_string().contains("max_staleness"), "{error}");
        // A down replica stays skipped whatever its views.
        p.replicas[0].up = false;
        let d = p
            .choose_with(&request(1000), now, |_| 0, true, Some(&fresh))
            .unwrap();
        assert_eq!(d.region.as_deref(), Some("ap-south"));
    }

    #[test]
    fn read_your_writes_needs_the_replayed_position() {
        let now = Instant::now();
        let mut p = picture(now);
        p.replicas[0].replay_lsn = Some(Lsn(10));
        let ryw = ReadRequest {
            min_lsn: Some(Lsn(500)),
            ..request(1000)
        };
        let d = p.choose(&ryw, now, |_| 0, true).unwrap();
        assert_eq!(
            (d.region.as_deref(), d.reason),
            (Some("ap-south"), Reason::ReadYourWrites)
        );
        // No replica has the write: the primary, which has it, serves the read, even where reads that no
        // replica fits are refused.
        for replica in &mut p.replicas {
            replica.replay_lsn = Some(Lsn(10));
        }
        let d = p.choose(&ryw, now, |_| 0, false).unwrap();
        assert_eq!(
            (d.target, d.reason),
            (Target::Primary, Reason::ReadYourWrites)
        );
    }

    #[test]
    fn region_order_is_home_then_nearest_or_static() {
        let now = Instant::now();
        let replicas = vec![
            replica(0, "far", 200, 0, now),
            replica(1, "near", 10, 0, now),
            replica(2, "home", 50, 0, now),
        ];
        let names = |v: Vec<Arc<str>>| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(region_order(&replicas, None, &[], Some("home"))),
            ["home", "near", "far"]
        );
        assert_eq!(
            names(region_order(&replicas, None, &[], None)),
            ["near", "home", "far"]
        );
        assert_eq!(
            names(region_order(
                &replicas,
                None,
                &["far".to_string()],
                Some("home")
            )),
            ["far", "home", "near"]
        );
    }
}
