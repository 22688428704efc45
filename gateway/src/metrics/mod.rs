//! The gateway's Prometheus metrics, behind one small module so the `prometheus` crate stays an implementation
//! detail. Names are `regiongate_<thing>_<unit>`; labels are bounded by design (no statement text, no client
//! addresses).

mod per_thread;
mod process;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use std::sync::{Arc, LazyLock};

pub struct Metrics {
    pub registry: Registry,
    pub client_connections: IntGauge,
    pub clients_accepted: IntCounter,
    pub clients_refused: IntCounterVec,
    pub server_connections: IntGauge,
    pub server_connect_errors: IntCounter,
    pub server_logins: IntCounterVec,
    pub pool_timeouts: IntCounter,
    /// Observed at every checkout, like the two below at every transaction: kept per thread.
    pub pool_wait_seconds: Arc<per_thread::Histograms>,
    pub transactions: Arc<per_thread::Counter>,
    pub server_lost: IntCounter,
    pub errors_sent: IntCounterVec,
    pub server_errors: IntCounterVec,
    pub cancels: IntCounterVec,
    pub routed: IntCounterVec,
    /// Reads served over their budget while no node took writes (`routing.when_primary_down: serve_stale`).
    pub stale_reads: IntCounterVec,
    /// Transactions by where they started and how they ended (see `session::replay`).
    pub transactions_routed: IntCounterVec,
    pub reloads: IntCounter,
    pub slow_statements: IntCounter,
    pub statement_timeouts: IntCounter,
    pub settings_replays: IntCounter,
    pub settings_replay_failures: IntCounter,
    pub settings_captures: IntCounter,
    /// `regiongate_request_seconds{role}`: series 0 is the primary, 1 the replicas (see `request_seconds`).
    request_seconds: Arc<per_thread::Histograms>,
    pub nplus1_episodes: IntCounterVec,
    pub nplus1_statements: IntCounterVec,
    pub batch_rows: Histogram,
    pub batch_flush_seconds: Histogram,
    pub batch_wait_seconds: Histogram,
    pub batched_rows: IntCounterVec,
    pub batches: IntCounterVec,
    pub batch_queue_full: IntCounter,
    /// 0 serving, 1 draining, 2 cutting (see `drain`).
    pub draining: IntGauge,
    pub drain_clients: IntCounterVec,
    /// `routing.max_lag`, for alert rules that compare replica lag with the budget.
    pub max_lag_seconds: prometheus::Gauge,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let pool_wait_seconds = Arc::new(per_thread::Histograms::new(
            "regiongate_pool_wait_seconds",
            "Time a client waited for a server connection",
            &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
            None,
        ));
        per_thread::register(&registry, &pool_wait_seconds);
        let request_seconds = Arc::new(per_thread::Histograms::new(
            "regiongate_request_seconds",
            "Time from a client's request (Query or Sync) to its ReadyForQuery, by the role of the server",
            &[0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
            Some(("role", &["primary", "replica"])),
        ));
        per_thread::register(&registry, &request_seconds);
        let transactions = Arc::new(per_thread::Counter::new(
            "regiongate_server_checkouts_total",
            "Server connection checkouts completed (one per transaction in transaction mode)",
        ));
        per_thread::register(&registry, &transactions);
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let seconds = vec![
            0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
        ];
        for collector in regions::metrics::collectors()
            .into_iter()
            .chain(views::metrics::collectors())
        {
            registry.register(collector).expect("unique metric");
        }
        registry
            .register(Box::new(process::Process::new()))
            .expect("unique metric");
        let build = prometheus::IntGaugeVec::new(
            Opts::new(
                "regiongate_build_info",
                "1, labelled with the version and the commit the binary was built from",
            ),
            &["version", "commit"],
        )
        .expect("valid metric");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("REGIONGATE_COMMIT")])
            .set(1);
        registry.register(Box::new(build)).expect("unique metric");
        let max_lag_seconds = prometheus::Gauge::new(
            "regiongate_routing_max_lag_seconds",
            "The staleness budget reads accept by default (routing.max_lag)",
        )
        .expect("valid metric");
        registry
            .register(Box::new(max_lag_seconds.clone()))
            .expect("unique metric");
        Metrics {
            client_connections: gauge(
                "regiongate_client_connections",
                "Client connections open now",
            ),
            clients_accepted: counter(
                "regiongate_clients_accepted_total",
                "Client connections accepted",
            ),
            clients_refused: counter_vec(
                "regiongate_clients_refused_total",
                "Client connections refused, by SQLSTATE",
                &["sqlstate"],
            ),
            server_connections: gauge(
                "regiongate_server_connections",
                "Server connections open now",
            ),
            server_connect_errors: counter(
                "regiongate_server_connect_errors_total",
                "Failed attempts to open a server connection",
            ),
            server_logins: counter_vec(
                "regiongate_server_logins_total",
                "Server connections opened, by how the gateway authenticated (trust, password, md5, scram-sha-256, scram-sha-256-plus) and whether over TLS",
                &["method", "tls"],
            ),
            pool_timeouts: counter(
                "regiongate_pool_timeouts_total",
                "Checkouts that gave up after the checkout timeout",
            ),
            pool_wait_seconds,
            transactions,
            server_lost: counter(
                "regiongate_server_lost_total",
                "Server connections that broke while a client used them",
            ),
            server_errors: counter_vec(
                "regiongate_server_errors_total",
                "ErrorResponses from servers relayed to clients, by SQLSTATE class",
                &["class"],
            ),
            errors_sent: counter_vec(
                "regiongate_errors_total",
                "Errors the gateway itself sent to clients, by SQLSTATE class",
                &["class"],
            ),
            cancels: counter_vec(
                "regiongate_cancel_requests_total",
                "Cancel requests, by outcome",
                &["outcome"],
            ),
            reloads: counter(
                "regiongate_config_reloads_total",
                "Configuration reloads that took effect",
            ),
            slow_statements: counter(
                "regiongate_slow_statements_total",
                "Requests slower than log.slow_statement",
            ),
            statement_timeouts: counter(
                "regiongate_statement_timeouts_total",
                "Requests cancelled on their server for running past limits.statement_timeout",
            ),
            settings_replays: counter(
                "regiongate_settings_replays_total",
                "Server connections given a client's settings and identity before its statement",
            ),
            settings_replay_failures: counter(
                "regiongate_settings_replay_failures_total",
                "Settings replays the server refused: the connection was closed and the statement not run there",
            ),
            settings_captures: counter(
                "regiongate_settings_captures_total",
                "Reads of a session's settings after a request that may have changed them",
            ),
            request_seconds,
            nplus1_episodes: counter_vec(
                "regiongate_nplus1_episodes_total",
                "N+1 episodes: one statement shape repeated after a parent, by fingerprint (the first 50, then other)",
                &["fingerprint"],
            ),
            nplus1_statements: counter_vec(
                "regiongate_nplus1_statements_total",
                "Statements that were part of N+1 episodes, by fingerprint (the first 50, then other)",
                &["fingerprint"],
            ),
            batch_rows: histogram(
                "regiongate_batch_rows",
                "Rows per insert batch",
                vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0],
            ),
            batch_flush_seconds: histogram(
                "regiongate_batch_flush_seconds",
                "Time to run an insert batch on the primary and answer its clients",
                seconds.clone(),
            ),
            batch_wait_seconds: histogram(
                "regiongate_batch_wait_seconds",
                "How long the oldest row of a batch waited in the queue",
                seconds,
            ),
            batched_rows: counter_vec(
                "regiongate_batched_rows_total",
                "Rows that went through insert batching, by table and how their batch ended \
                 (committed, one_by_one after the batch failed, lost with the connection; alone: the row had \
                 nothing to batch with and ran on its client's own connection)",
                &["table", "outcome"],
            ),
            batches: counter_vec(
                "regiongate_batches_total",
                "Insert batches, by table, how they were sent (copy_binary, copy_text, values) and how they \
                 ended (committed; one_by_one: the batch failed and its rows were run again one by one; lost: \
                 the connection broke)",
                &["table", "form", "outcome"],
            ),
            batch_queue_full: counter(
                "regiongate_batch_queue_full_total",
                "Inserts that waited because batching.max_queued_rows rows were queued",
            ),
            draining: gauge(
                "regiongate_draining",
                "The shutdown's phase: 0 serving, 1 draining (transactions finish), 2 cutting (the timeout passed)",
            ),
            drain_clients: counter_vec(
                "regiongate_drain_clients_total",
                "Client sessions ended during a shutdown: closed idle, finished their transaction, cut at the timeout, or left",
                &["outcome"],
            ),
            routed: counter_vec(
                "regiongate_routed_total",
                "Routing decisions, by region and role of the server chosen and the reason",
                &["region", "role", "reason"],
            ),
            stale_reads: counter_vec(
                "regiongate_stale_reads_total",
                "Reads served over their staleness budget because no node took writes (each with a NOTICE), by region",
                &["region"],
            ),
            transactions_routed: counter_vec(
                "regiongate_transactions_total",
                "Transactions that could write, by where they started (replica, primary) and their outcome: \
                 read-only (ended on the replica), moved (to the primary at the first write, validated), aborted \
                 (40001: the primary answered a read differently, or the transaction could not be replayed), \
                 predicted (started on the primary: transactions that start this way wrote recently)",
                &["start", "outcome"],
            ),
            max_lag_seconds,
            registry,
        }
    }

    /// Creates, at 0, the series a configuration makes known, so that every family is there before its first
    /// event and dashboards and alert rules see 0 rather than nothing. Labels that only events name (a SQLSTATE
    /// class) get the common values.
    pub fn prime(&self, config: &crate::config::Config) {
        self.max_lag_seconds
            .set(config.routing.max_lag.as_secs_f64());
        for sqlstate in ["28P01", "53300", "57P03", "08006"] {
            self.clients_refused.with_label_values(&[sqlstate]);
        }
        for class in ["08", "40", "53", "57"] {
            self.errors_sent.with_label_values(&[class]);
            self.server_errors.with_label_values(&[class]);
        }
        for outcome in ["forwarded", "failed", "no_query"] {
            self.cancels.with_label_values(&[outcome]);
        }
        for outcome in ["closed", "finished", "cut", "left"] {
            self.drain_clients.with_label_values(&[outcome]);
        }
        for (start, outcome) in [
            ("replica", "read-only"),
            ("replica", "moved"),
            ("replica", "aborted"),
            ("primary", "predicted"),
        ] {
            self.transactions_routed
                .with_label_values(&[start, outcome]);
        }
        let primary_region = config.primary.region.as_deref().unwrap_or("unknown");
        self.routed
            .with_label_values(&[primary_region, "primary", "write"]);
        for region in &config.regions {
            self.routed
                .with_label_values(&[&region.name, "replica", "within-budget"]);
            self.stale_reads.with_label_values(&[&region.name]);
        }
        for table in &config.batching.tables {
            for outcome in ["committed", "one_by_one", "lost"] {
                self.batched_rows.with_label_values(&[table, outcome]);
                self.batches.with_label_values(&[table, "values", outcome]);
            }
            self.batched_rows.with_label_values(&[table, "alone"]);
        }
        // Fingerprints come with the patterns; "other" (past the first 50) is a value of the family already.
        self.nplus1_episodes.with_label_values(&["other"]);
        self.nplus1_statements.with_label_values(&["other"]);
        let tls = if config.server_tls.enabled() {
            "yes"
        } else {
            "no"
        };
        self.server_logins
            .with_label_values(&["scram-sha-256", tls]);
    }

    /// The text exposition of every metric.
    /// Checkouts and their total wait in seconds.
    pub fn pool_wait_totals(&self) -> (u64, f64) {
        self.pool_wait_seconds.totals(0)
    }

    /// Requests answered and their total time in seconds, on the primary and on replicas together.
    pub fn request_totals(&self) -> (u64, f64) {
        let (a, b) = (
            self.request_seconds.totals(0),
            self.request_seconds.totals(1),
        );
        (a.0 + b.0, a.1 + b.1)
    }

    /// A request's time to its ReadyForQuery, on the primary or a replica.
    pub fn request_seconds(&self, replica: bool, seconds: f64) {
        self.request_seconds.observe(usize::from(replica), seconds);
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Counts an ErrorResponse from a server by its SQLSTATE class (the 'C' field of the body).
    pub fn server_error(&self, body: &[u8]) {
        let mut rest = body;
        while let Some((&field, tail)) = rest.split_first() {
            let Some(end) = memchr::memchr(0, tail) else {
                return;
            };
            if field == b'C' {
                let class = tail
                    .get(..2)
                    .and_then(|c| std::str::from_utf8(c).ok())
                    .unwrap_or("XX");
                self.server_errors.with_label_values(&[class]).inc();
                return;
            }
            if field == 0 {
                return;
            }
            rest = &tail[end + 1..];
        }
    }

    pub fn error_sent(&self, code: &str) {
        self.errors_sent
            .with_label_values(&[code.get(..2).unwrap_or("XX")])
            .inc();
    }
}
