//! Materialized views: declared in the configuration, created when missing, refreshed on the primary on a
//! schedule, and watched on every replica for how fresh each view's copy is. Also the schema migrations
//! (`regiongate migrate`). This crate knows servers only as connection settings handed to it: it knows nothing
//! of client sockets or of how reads are routed (the gateway asks [`Views::fits`]).

pub mod config;
pub mod freshness;
pub mod metrics;
pub mod migrate;
pub mod refresh;
pub mod schedule;

pub use crate::config::{validate, ViewSpec, MAX_VIEWS};
pub use crate::freshness::Freshness;
pub use crate::refresh::{Outcome, RefreshError};
pub use crate::schedule::Schedule;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// A server the freshness probes read, with the region it is in (a metric label and a SHOW VIEWS column).
#[derive(Clone)]
pub struct Target {
    pub region: String,
    pub config: tokio_postgres::Config,
    /// TLS for the connection, as the gateway's `server_tls` says (the sslmode is in `config`).
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("region", &self.region)
            .field("config", &self.config)
            .finish()
    }
}

/// Where the views live and who refreshes them.
#[derive(Clone, Debug)]
pub struct Setup {
    pub views: Vec<ViewSpec>,
    /// The primary, for refreshes.
    pub primary: Target,
    /// The replicas in the regions crate's order (index = its `ReplicaId`).
    pub replicas: Vec<Target>,
    /// This gateway's name in the history table.
    pub gateway: String,
    /// How often replicas' freshness is read.
    pub monitor_interval: Duration,
}

/// The live views of one configuration: scheduler and probe tasks, what they learned, and REFRESH VIEW.
/// A reload that changes the views stops these (after any refresh in flight) and starts new ones.
pub struct Views {
    setup: Setup,
    pool: deadpool_postgres::Pool,
    /// One refresh of a view at a time within this gateway (the advisory lock does it across gateways).
    running: Vec<tokio::sync::Mutex<()>>,
    /// Whether each view is known to exist (with its unique index); until then each attempt tries to create it
    /// first, so a definition that failed at start is retried by its schedule and reported with its own error.
    created: Vec<std::sync::atomic::AtomicBool>,
    /// The history table exists (made once per runtime, by whichever comes first: the start's preparation or
    /// a refresh asked for before it finished).
    history_ready: tokio::sync::OnceCell<()>,
    next_run: Mutex<Vec<Option<SystemTime>>>,
    freshness: freshness::Shared,
    /// The primary's own view of each view's freshness (SHOW VIEWS; reads there are always current).
    primary_freshness: arc_swap::ArcSwap<Vec<Option<Instant>>>,
    max_staleness: Vec<Duration>,
    stop: watch::Sender<bool>,
}

/// One row of SHOW VIEWS.
#[derive(Clone, Debug)]
pub struct ViewStatus {
    pub name: String,
    pub schedule: String,
    pub max_staleness: Duration,
    /// The newest successful refresh: when it finished, how long it took, rows.
    pub last_refresh: Option<SystemTime>,
    pub duration: Option<Duration>,
    pub rows: Option<i64>,
    /// The newest attempt's error, if it failed.
    pub last_error: Option<String>,
    pub next_run: Option<SystemTime>,
    /// (region, staleness there): the primary's region first, then each region's freshest replica.
    pub staleness: Vec<(String, Option<Duration>)>,
}

impl Views {
    /// Builds the runtime and starts its tasks: creating missing views, then one scheduler per view, and
    /// one freshness probe per replica and for the primary. With no views it starts nothing.
    pub fn start(setup: Setup) -> Arc<Views> {
        let manager = deadpool_postgres::Manager::from_config(
            setup.primary.config.clone(),
            setup.primary.tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(setup.views.len().clamp(1, 4) + 1)
            .build()
            .expect("a pool without a runtime-specific timeout builds");
        let views = Arc::new(Views {
            running: setup.views.iter().map(|_| Default::default()).collect(),
            created: setup.views.iter().map(|_| Default::default()).collect(),
            history_ready: Default::default(),
            next_run: Mutex::new(vec![None; setup.views.len()]),
            freshness: Default::default(),
            primary_freshness: Default::default(),
            max_staleness: setup.views.iter().map(ViewSpec::max_staleness).collect(),
            stop: watch::channel(false).0,
            pool,
            setup,
        });
        // Each view's counters from the start, at 0, so that alerts on refresh failures see them.
        for view in &views.setup.views {
            metrics::REFRESH_FAILURES.with_label_values(&[&view.name]);
            for outcome in ["refreshed", "failed"] {
                metrics::REFRESHES.with_label_values(&[&view.name, outcome]);
            }
        }
        if !views.setup.views.is_empty() {
            tokio::spawn(views.clone().run());
        }
        views
    }

    /// Stops the tasks; a refresh in flight finishes first.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Waits until no refresh runs (after [`Views::stop`]: until the ones in flight have committed or
    /// failed).
    pub async fn settled(&self) {
        for running in &self.running {
            drop(running.lock().await);
        }
    }

    pub fn specs(&self) -> &[ViewSpec] {
        &self.setup.views
    }

    /// Whether a read of `views` (a set of indexes into [`Views::specs`]) fits `replica` now.
    pub fn fits(&self, views: u64, replica: usize, now: Instant) -> bool {
        freshness::fits(
            &self.freshness.load(),
            &self.max_staleness,
            views,
            replica,
            now,
        )
    }

    async fn run(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        // Creating views needs the history table; both are retried until the primary answers.
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.prepare().await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot prepare the views' tables on the primary; retrying");
                    if sleep_or_stop(backoff, &mut stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        for index in 0..self.setup.views.len() {
            tokio::spawn(self.clone().schedule(index));
        }
        let names: Vec<String> = self.setup.views.iter().map(|v| v.name.clone()).collect();
        for (id, target) in self.setup.replicas.iter().enumerate() {
            tokio::spawn(probe(self.clone(), Some(id), target.clone(), names.clone()));
        }
        tokio::spawn(probe(self.clone(), None, self.setup.primary.clone(), names));
    }

    /// Creates the view if it is missing (once per runtime; see `created`).
    async fn ensure_exists(
        &self,
        client: &mut tokio_postgres::Client,
        index: usize,
    ) -> Result<(), RefreshError> {
        use std::sync::atomic::Ordering;
        if self.created[index].load(Ordering::Acquire) {
            return Ok(());
        }
        self.ensure_history(client).await?;
        let view = &self.setup.views[index];
        let started = Instant::now();
        if refresh::ensure_exists(client, view, &self.setup.gateway).await? {
            tracing::info!(view = %view.name, took_ms = started.elapsed().as_millis() as u64, "view created");
        }
        self.created[index].store(true, Ordering::Release);
        Ok(())
    }

    /// Creates the history table if it is missing (once per runtime).
    /// One at a time: two concurrent `CREATE SCHEMA IF NOT EXISTS` can still collide in PostgreSQL.
    async fn ensure_history(&self, client: &tokio_postgres::Client) -> Result<(), RefreshError> {
        self.history_ready
            .get_or_try_init(|| async {
                // IF NOT EXISTS notices would be logged by tokio-postgres on every start.
                client
                    .batch_execute("SET client_min_messages = warning")
                    .await?;
                client.batch_execute(refresh::SCHEMA_SQL).await?;
                Ok::<(), RefreshError>(())
            })
            .await
            .map(drop)
    }

    /// The history table, and every view that does not exist yet. A view that cannot be created is reported
    /// (log, metric, history row) and left to its schedule, whose refreshes will report it again.
    async fn prepare(&self) -> Result<(), RefreshError> {
        let mut client = self.pool.get().await?;
        self.ensure_history(&client).await?;
        for (index, view) in self.setup.views.iter().enumerate() {
            let started = Instant::now();
            match self.ensure_exists(&mut client, index).await {
                Ok(()) => {}
                Err(error) => {
                    refresh::record_failure(
                        &client,
                        view,
                        None,
                        &self.setup.gateway,
                        started,
                        &error,
                    )
                    .await;
                    metrics::REFRESH_FAILURES
                        .with_label_values(&[&view.name])
                        .inc();
                    tracing::error!(view = %view.name, error = %error, "cannot create the view");
                }
            }
        }
        Ok(())
    }

    /// One view's schedule: wait for each slot, refresh, retry a failure with backoff until it succeeds or
    /// the next slot is due.
    async fn schedule(self: Arc<Self>, index: usize) {
        let mut stop = self.stop.subscribe();
        let view = &self.setup.views[index];
        let mut after = SystemTime::now();
        loop {
            let Some(slot) = view.schedule.next_slot(after) else {
                self.set_next_run(index, None);
                return;
            };
            self.set_next_run(index, Some(slot));
            let wait = slot.duration_since(SystemTime::now()).unwrap_or_default();
            if sleep_or_stop(wait, &mut stop).await {
                return;
            }
            let mut backoff = Duration::from_secs(1);
            while self.run_once(index, Some(slot)).await.is_err() {
                let retry_at = SystemTime::now() + backoff;
                if view
                    .schedule
                    .next_slot(slot)
                    .is_none_or(|next| retry_at >= next)
                {
                    break;
                }
                self.set_next_run(index, Some(retry_at));
                if sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
            // A refresh longer than the period skips the slots it overran rather than running them back to back.
            after = slot.max(SystemTime::now());
        }
    }

    /// REFRESH VIEW from the admin console: refreshes now, outside the schedule (after a refresh of the view in
    /// flight, here or in another gateway).
    pub async fn refresh_now(&self, name: &str) -> Result<Outcome, RefreshError> {
        let index = self
            .setup
            .views
            .iter()
            .position(|v| v.name == name || v.relation() == name)
            .ok_or_else(|| RefreshError::UnknownView(name.to_string()))?;
        // Waits for a scheduled refresh of this view in flight here, then runs.
        let _one_at_a_time = self.running[index].lock().await;
        self.attempt(index, None).await
    }

    /// One scheduled attempt; gives way to a refresh of the view in flight here.
    async fn run_once(
        &self,
        index: usize,
        slot: Option<SystemTime>,
    ) -> Result<Outcome, RefreshError> {
        let view = &self.setup.views[index];
        let Ok(_one_at_a_time) = self.running[index].try_lock() else {
            metrics::REFRESHES
                .with_label_values(&[&view.name, "busy"])
                .inc();
            return Ok(Outcome::Busy);
        };
        self.attempt(index, slot).await
    }

    /// One attempt, with its metrics and event.
    async fn attempt(
        &self,
        index: usize,
        slot: Option<SystemTime>,
    ) -> Result<Outcome, RefreshError> {
        let view = &self.setup.views[index];
        let result = async {
            let mut client = self.pool.get().await?;
            let started = Instant::now();
            if let Err(error) = self.ensure_exists(&mut client, index).await {
                refresh::record_failure(&client, view, slot, &self.setup.gateway, started, &error)
                    .await;
                return Err(error);
            }
            refresh::refresh(&mut client, view, slot, &self.setup.gateway).await
        }
        .await;
        let slot_secs = slot
            .and_then(|s| s.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|s| s.as_secs_f64());
        match &result {
            Ok(Outcome::Refreshed {
                rows,
                took,
                concurrently,
            }) => {
                metrics::REFRESHES
                    .with_label_values(&[&view.name, "refreshed"])
                    .inc();
                metrics::REFRESH_SECONDS
                    .with_label_values(&[&view.name])
                    .observe(took.as_secs_f64());
                tracing::info!(view = %view.name, slot = slot_secs, rows, took_ms = took.as_millis() as u64, concurrently, "view refreshed");
            }
            Ok(Outcome::AlreadyDone) => {
                metrics::REFRESHES
                    .with_label_values(&[&view.name, "already-done"])
                    .inc();
                tracing::debug!(view = %view.name, slot = slot_secs, "run already done by another gateway");
            }
            Ok(Outcome::Busy) => {
                metrics::REFRESHES
                    .with_label_values(&[&view.name, "busy"])
                    .inc();
                tracing::debug!(view = %view.name, slot = slot_secs, "another refresh holds the view's lock");
            }
            Err(error) => {
                metrics::REFRESHES
                    .with_label_values(&[&view.name, "failed"])
                    .inc();
                metrics::REFRESH_FAILURES
                    .with_label_values(&[&view.name])
                    .inc();
                tracing::error!(view = %view.name, slot = slot_secs, error = %error, sqlstate = error.sqlstate(), "view refresh failed");
            }
        }
        result
    }

    fn set_next_run(&self, index: usize, at: Option<SystemTime>) {
        if let Some(slot) = self
            .next_run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
        {
            *slot = at;
        }
    }

    /// SHOW VIEWS: the history from the primary, next runs from the schedulers, staleness from the probes.
    pub async fn status(&self) -> Result<Vec<ViewStatus>, RefreshError> {
        let client = self.pool.get().await?;
        let names: Vec<String> = self.setup.views.iter().map(|v| v.name.clone()).collect();
        let rows = client
            .query(
                "SELECT v.name, s.finished_at, extract(epoch FROM s.finished_at - s.started_at)::float8, s.rows,
                        (SELECT l.error FROM regiongate.view_refreshes l WHERE l.view_name = v.name
                         ORDER BY l.id DESC LIMIT 1)
                 FROM unnest($1::text[]) AS v(name)
                 LEFT JOIN LATERAL (SELECT * FROM regiongate.view_refreshes r
                                    WHERE r.view_name = v.name AND r.error IS NULL
                                    ORDER BY r.id DESC LIMIT 1) s ON true",
                &[&names],
            )
            .await?;
        let next_run = self
            .next_run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let freshness = self.freshness.load();
        let primary_freshness = self.primary_freshness.load();
        let now = Instant::now();
        let age = |at: Option<Instant>| at.map(|t| now.saturating_duration_since(t));
        Ok(self
            .setup
            .views
            .iter()
            .enumerate()
            .map(|(i, view)| {
                let row = rows.iter().find(|r| r.get::<_, &str>(0) == view.name);
                let mut staleness = vec![(
                    self.setup.primary.region.clone(),
                    age(primary_freshness.get(i).copied().flatten()),
                )];
                for (id, replica) in self.setup.replicas.iter().enumerate() {
                    let here = age(freshness
                        .refreshed
                        .get(id)
                        .and_then(|v| v.get(i))
                        .copied()
                        .flatten());
                    match staleness.iter_mut().find(|(r, _)| *r == replica.region) {
                        Some((_, best)) => *best = min_known(*best, here),
                        None => staleness.push((replica.region.clone(), here)),
                    }
                }
                ViewStatus {
                    name: view.name.clone(),
                    schedule: view.schedule.to_string(),
                    max_staleness: view.max_staleness(),
                    last_refresh: row.and_then(|r| r.get(1)),
                    duration: row
                        .and_then(|r| r.get::<_, Option<f64>>(2))
                        .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok()),
                    rows: row.and_then(|r| r.get(3)),
                    last_error: row.and_then(|r| r.get(4)),
                    next_run: next_run.get(i).copied().flatten(),
                    staleness,
                }
            })
            .collect())
    }
}

fn min_known(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sleeps, or returns true at once when the views are stopped.
async fn sleep_or_stop(duration: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(duration) => false,
        _ = stop.wait_for(|stopped| *stopped) => true,
    };
    stopped || *stop.borrow()
}

/// Reads one server's view freshness every monitor interval. `replica` is its index, `None` for the primary.
async fn probe(views: Arc<Views>, replica: Option<usize>, target: Target, names: Vec<String>) {
    let mut stop = views.stop.subscribe();
    let interval = views.setup.monitor_interval;
    let mut client: Option<(tokio_postgres::Client, tokio_postgres::Statement)> = None;
    let mut backoff = interval;
    loop {
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            client = match connect(&target).await {
                Ok(c) => {
                    backoff = interval;
                    Some(c)
                }
                Err(error) => {
                    tracing::debug!(region = %target.region, error = %refresh::describe(&error), "view freshness probe cannot connect");
                    views.publish(replica, vec![None; names.len()], &target.region);
                    if sleep_or_stop(backoff, &mut stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
        }
        let (c, statement) = client.as_ref().expect("connected above");
        let probed_at = Instant::now();
        match c.query(statement, &[&names]).await {
            Ok(rows) => {
                let ages: Vec<Option<f64>> = names
                    .iter()
                    .map(|n| {
                        rows.iter()
                            .find(|r| r.get::<_, &str>(0) == n)
                            .and_then(|r| r.get(1))
                    })
                    .collect();
                views.publish(
                    replica,
                    freshness::instants(probed_at, &ages),
                    &target.region,
                );
            }
            Err(error) => {
                // The history table may not have reached this replica yet: unknown freshness, not an outage.
                tracing::debug!(region = %target.region, error = %refresh::describe(&error), "view freshness probe failed");
                views.publish(replica, vec![None; names.len()], &target.region);
                client = None;
            }
        }
        if sleep_or_stop(interval.saturating_sub(probed_at.elapsed()), &mut stop).await {
            return;
        }
    }
}

async fn connect(
    target: &Target,
) -> Result<(tokio_postgres::Client, tokio_postgres::Statement), tokio_postgres::Error> {
    let (client, connection) = target.config.connect(target.tls.clone()).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let statement = client.prepare(freshness::PROBE_SQL).await?;
    Ok((client, statement))
}

impl Views {
    fn publish(&self, replica: Option<usize>, refreshed: Vec<Option<Instant>>, region: &str) {
        let now = Instant::now();
        for (view, at) in self.setup.views.iter().zip(&refreshed) {
            let gauge = metrics::STALENESS_SECONDS.with_label_values(&[&view.name, region]);
            match at {
                Some(at) => gauge.set(now.saturating_duration_since(*at).as_secs_f64()),
                // Unknown: NaN rather than a reassuring 0.
                None => gauge.set(f64::NAN),
            }
        }
        match replica {
            Some(id) => freshness::publish(&self.freshness, id, refreshed),
            None => self.primary_freshness.store(Arc::new(refreshed)),
        }
    }
}
