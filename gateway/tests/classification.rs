//! The read/write classifier against PostgreSQL itself: statements generated from a grammar of reads, writes
//! and function calls in every position are classified, then run on a hot standby. A statement classed as a
//! read must run there; one classed as a write must be refused there as a write, or call a function that a
//! standby runs but whose effect belongs on the primary (an advisory lock, `set_config`).
//!
//! The seed is fixed so that CI runs the same statements every time; `CLASSIFY_SEED` and
//! `CLASSIFY_STATEMENTS` explore others.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use regiongate::route::{Access, Classifier};
use std::time::Duration;
use testbed::{RegionSpec, Topology};

/// Whether a hot standby refused a statement as a write: "cannot execute … in a read-only transaction"
/// (25006), or "cannot … during recovery" (assigning a transaction id or an OID: 55000, XX000).
fn refused_as_write(error: &tokio_postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|e| e.code().code() == "25006" || e.message().contains("during recovery"))
}

/// Functions a standby runs, but whose effect is only right on the primary (a lock no one else sees there).
const PRIMARY_SEMANTICS: [&str; 2] = ["pg_advisory_xact_lock(7)", "set_config('app.x', 'y', true)"];

/// Calls that read, typed text.
const READ_CALLS: [&str; 5] = [
    "abs(-3)::text",
    "length('abc')::text",
    "now()::text",
    "current_setting('search_path')",
    "upper('x')",
];

/// Calls a standby refuses, typed text. All are volatile, so PostgreSQL runs them wherever they are, even
/// where their value is not used.
const WRITE_CALLS: [&str; 4] = [
    "nextval('s')::text",
    "setval('s', 5)::text",
    "pg_notify('c', 'x')::text",
    "lo_create(0)::text",
];

/// Calls a standby refuses that are stable: the planner drops them where their value is not used (a
/// subquery's unused column), so they are generated only where the value is the statement's result.
const STABLE_WRITE_CALLS: [&str; 2] = ["txid_current()::text", "pg_current_xact_id()::text"];

struct Grammar {
    rng: StdRng,
}

impl Grammar {
    fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
        choices[self.rng.random_range(0..choices.len())]
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    /// A text-typed expression, never null, whose every call runs when it is evaluated (no CASE, no
    /// coalesce: a call that PostgreSQL skips could not show what it does).
    fn expr(&mut self, depth: u32) -> String {
        let leaf = depth == 0 || self.chance(0.4);
        match self.rng.random_range(0..if leaf { 4 } else { 8 }) {
            0 => "'x'".into(),
            1 | 2 => self.pick(&READ_CALLS).into(),
            3 => {
                if self.chance(0.7) {
                    self.pick(&WRITE_CALLS).into()
                } else {
                    format!("{}::text", self.pick(&PRIMARY_SEMANTICS))
                }
            }
            // One value from every row: the whole subquery runs (a LIMIT would stop it early).
            4 => format!(
                "(SELECT string_agg(c, ',') FROM ({}) sub(c))",
                self.query(depth - 1, false)
            ),
            5 => format!("concat({}, {})", self.expr(depth - 1), self.expr(depth - 1)),
            6 => format!("upper({})", self.expr(depth - 1)),
            _ => format!("({} || {})", self.expr(depth - 1), self.expr(depth - 1)),
        }
    }

    /// A FROM item whose columns nothing refers to.
    fn table_ref(&mut self, depth: u32) -> String {
        match self.rng.random_range(0..if depth == 0 { 3 } else { 8 }) {
            0 => "t".into(),
            1 => "generate_series(1, 2) g".into(),
            2 => {
                let call = self.pick(&["nextval('s')", "lo_create(0)", "abs(1)", "upper('a')"]);
                format!("{call} f")
            }
            3 => format!("(VALUES ({})) v", self.expr(depth - 1)),
            4 => format!("({}) q", self.query(depth - 1, false)),
            5 => format!("t, LATERAL ({}) l", self.query(depth - 1, false)),
            6 => {
                let call = self.pick(&["nextval('s')", "abs(1)", "generate_series(1, 3)"]);
                format!("ROWS FROM (generate_series(1, 2), {call}) r")
            }
            _ => "(TABLE t) tt".into(),
        }
    }

    /// A query of one text column; `top`: a whole statement, where a data-modifying CTE may be.
    fn query(&mut self, depth: u32, top: bool) -> String {
        let mut query = match self.rng.random_range(0..if depth == 0 { 2 } else { 6 }) {
            0 => format!("SELECT {}", self.expr(depth)),
            1 => "TABLE t".into(),
            2 => format!(
                "SELECT {} FROM {}",
                self.expr(depth - 1),
                self.table_ref(depth - 1)
            ),
            3 => format!(
                "SELECT {} FROM {} WHERE {} IS NOT NULL",
                self.expr(depth - 1),
                self.table_ref(depth - 1),
                self.expr(depth - 1)
            ),
            4 => {
                let inner = match self.rng.random_range(0..if top { 5 } else { 1 }) {
                    1 => "INSERT INTO t VALUES ('w') RETURNING a".to_string(),
                    2 => "DELETE FROM t WHERE a = 'zz' RETURNING a".to_string(),
                    3 => "UPDATE t SET a = 'y' WHERE a = 'zz' RETURNING a".to_string(),
                    _ => self.query(depth - 1, false),
                };
                format!("WITH w(c) AS ({inner}) SELECT c FROM w")
            }
            _ => {
                let clause = self.pick(&[
                    "SEARCH DEPTH FIRST BY n SET ord",
                    "SEARCH BREADTH FIRST BY n SET ord",
                    "CYCLE n SET looped USING path",
                ]);
                format!(
                    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) {clause} \
                     SELECT {} FROM r",
                    self.expr(depth - 1)
                )
            }
        };
        if depth > 0 && self.chance(0.15) {
            query = format!("{query} UNION ALL ({})", self.query(depth - 1, false));
        }
        query
    }

    /// A whole statement.
    fn statement(&mut self) -> String {
        let depth = self.rng.random_range(1..4);
        match self.rng.random_range(0..15) {
            0..=5 => self.query(depth, true),
            6 => format!("EXPLAIN (COSTS OFF) {}", self.query(depth, true)),
            7 => format!("EXPLAIN (ANALYZE, COSTS OFF) {}", self.query(depth, true)),
            8 => format!(
                "SELECT {}, {} FROM {}",
                self.pick(&STABLE_WRITE_CALLS),
                self.expr(depth - 1),
                self.table_ref(depth - 1)
            ),
            13 => "SELECT a FROM t FOR UPDATE".into(),
            9 => format!("SELECT {} FROM t FOR SHARE", self.expr(depth)),
            10 => format!("INSERT INTO t SELECT {}", self.expr(depth)),
            11 => format!("UPDATE t SET a = {}", self.expr(depth)),
            12 => format!("DELETE FROM t WHERE a = {}", self.expr(depth)),
            _ => format!("VALUES ({})", self.expr(depth)),
        }
    }
}

fn uses_primary_semantics(sql: &str) -> bool {
    PRIMARY_SEMANTICS.iter().any(|call| sql.contains(call))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_statements_are_classed_as_a_hot_standby_runs_them() {
    let seed: u64 = std::env::var("CLASSIFY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261202);
    let count: usize = std::env::var("CLASSIFY_STATEMENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let topology = tokio::task::spawn_blocking(|| {
        let topology = Topology::start(
            "primary-region",
            Duration::ZERO,
            &[RegionSpec::new("standby-region", 1, Duration::ZERO)],
        )
        .expect("starting a primary and a standby");
        topology
            .primary
            .cluster
            .psql(
                "postgres",
                "CREATE TABLE t (a text); INSERT INTO t VALUES ('x'); CREATE SEQUENCE s;",
            )
            .expect("creating the schema");
        topology
    })
    .await
    .unwrap();
    let standby = &topology.regions[0].replicas[0].cluster;
    let client = common::connect(&format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname=postgres",
        standby.port(),
        testbed::SUPERUSER_PASSWORD
    ))
    .await;
    let replayed = common::eventually(Duration::from_secs(20), || async {
        client
            .query_one("SELECT count(*) FROM pg_class WHERE relname = 's'", &[])
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == 1)
    })
    .await;
    assert!(replayed, "the standby never showed the schema");

    let classifier = Classifier::new(&[]);
    let mut grammar = Grammar {
        rng: StdRng::seed_from_u64(seed),
    };
    let (mut reads, mut writes) = (0, 0);
    for _ in 0..count {
        let sql = grammar.statement();
        let access = classifier.classify(sql.as_bytes()).access;
        let ran = client.simple_query(&sql).await;
        match (access, ran.as_ref().err()) {
            (Access::Read, None) => reads += 1,
            (Access::Read, Some(error)) if refused_as_write(error) => panic!(
                "classed as a read, but the standby refused it as a write ({error:?}):\n{sql}\n(seed {seed})"
            ),
            (Access::Write, Some(error)) if refused_as_write(error) => writes += 1,
            (Access::Write, None) if uses_primary_semantics(&sql) => writes += 1,
            (Access::Write, None) => {
                panic!("classed as a write, but the standby ran it:\n{sql}\n(seed {seed})")
            }
            (access, error) => panic!(
                "{access:?}, and the standby said {error:?}: the grammar made a statement that is not \
                 valid:\n{sql}\n(seed {seed})"
            ),
        }
    }
    eprintln!("{count} statements (seed {seed}): {reads} reads ran on the standby, {writes} writes were refused there or need the primary");
    // Both classes are well represented, or the test proves little.
    assert!(
        reads > count / 5 && writes > count / 5,
        "{reads} reads, {writes} writes"
    );
}
