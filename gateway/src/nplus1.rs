//! N+1 query detection: a session that, right after some statement (the parent), runs one statement shape
//! over and over with different values is an ORM loading a list and then fetching each item's relatives one
//! query at a time. The gateway sees every session's statements in order, so it finds these loops for every
//! application behind it.
//!
//! Per session, a [`Detector`] watches the sequence of statement shapes. A run of the same shape, at least
//! `threshold` long, with at least two different values, within `window`, that follows a *different*
//! statement, is an episode. A hot statement that a session fires once per transaction (pgbench -S) has no
//! parent: its runs follow only itself, so it is never reported. Episodes are logged once each and added up in
//! [`Patterns`], the bounded table behind `SHOW NPLUS1` and the metrics.

use crate::fingerprint;
use crate::metrics::METRICS;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Patterns kept in the table; beyond it the least frequent one makes room.
const MAX_PATTERNS: usize = 1000;
/// Patterns with a metric label of their own; later ones count under "other" (bounded cardinality).
const MAX_LABELLED: usize = 50;
/// Distinct values remembered per run (enough to tell "different values").
const MAX_VALUES: usize = 8;

/// What a session runs, one statement at a time.
pub struct Statement<'a> {
    pub shape: u64,
    /// A query that reads (SELECT or WITH): only reads make N+1 loops; a loop of single-row writes is a
    /// batching matter, not this one.
    pub read: bool,
    pub text: &'a Bytes,
    /// A hash of the statement's values: its parameters, or (simple protocol) its whole text.
    pub values: u64,
    /// Values to show in a report when `log_parameters` is on.
    pub sample: Option<String>,
    /// When it was sent (the caller has read the clock already).
    pub at: Instant,
}

struct Run {
    shape: u64,
    text: Bytes,
    count: u32,
    started: Instant,
    /// Where the run's window ends (None: past what the clock can say): a comparison per statement, where
    /// the time since `started` would be a subtraction.
    window_end: Option<Instant>,
    last: Instant,
    /// The first few distinct value hashes (a tiny set: no hashing of hashes on the hot path).
    values: [u64; MAX_VALUES],
    distinct: usize,
    samples: Vec<String>,
    parent: Option<Bytes>,
}

/// One session's detector.
#[derive(Default)]
pub struct Detector {
    run: Option<Run>,
    /// The previous statement, which becomes the parent of a run that starts now.
    previous: Option<(u64, Bytes)>,
    /// Some text kept is a slice of the session's read buffer (see [`Detector::unpin`]).
    borrowed: bool,
}

/// Who ran an episode, for its report.
pub struct Origin<'a> {
    pub user: &'a str,
    pub application_name: &'a str,
    pub client: std::net::SocketAddr,
}

/// The `nplus1` section of the configuration: what makes an episode, and what its report shows.
pub type Settings = crate::config::NPlusOneConfig;

impl Detector {
    /// Notes a statement; reports the run it ends if that was an episode.
    pub fn observe(
        &mut self,
        statement: Statement<'_>,
        settings: &Settings,
        patterns: &Patterns,
        origin: &Origin<'_>,
    ) {
        if !statement.read {
            self.finish(settings, patterns, origin);
            self.previous = Some((statement.shape, statement.text.clone()));
            self.borrowed = true;
            return;
        }
        let now = statement.at;
        let continues = self.run.as_ref().is_some_and(|r| {
            r.shape == statement.shape && r.window_end.is_none_or(|end| now <= end)
        });
        if continues {
            let run = self.run.as_mut().expect("checked above");
            run.count += 1;
            run.last = now;
            if run.distinct < MAX_VALUES && !run.values[..run.distinct].contains(&statement.values)
            {
                run.values[run.distinct] = statement.values;
                run.distinct += 1;
            }
            if let Some(sample) = statement.sample {
                if run.samples.len() < 3 {
                    run.samples.push(sample);
                }
            }
        } else {
            self.finish(settings, patterns, origin);
            let parent = self
                .previous
                .as_ref()
                .filter(|(shape, _)| *shape != statement.shape)
                .map(|(_, text)| text.clone());
            self.run = Some(Run {
                shape: statement.shape,
                text: statement.text.clone(),
                count: 1,
                started: now,
                window_end: now.checked_add(settings.window),
                last: now,
                values: [statement.values; MAX_VALUES],
                distinct: 1,
                samples: statement.sample.into_iter().collect(),
                parent,
            });
            self.borrowed = true;
        }
        // The parent is shown canonical, so any statement of its shape serves: in a run, keep the one held.
        if self.previous.as_ref().map(|(shape, _)| *shape) != Some(statement.shape) {
            self.previous = Some((statement.shape, statement.text.clone()));
            self.borrowed = true;
        }
    }

    /// The client is idle: the texts kept become copies of their own. The session hands over slices of the
    /// client's read buffer, and holding one while the client idles would keep that buffer's whole
    /// allocation from being reused (several KB per idle client, and a new buffer at its next request).
    /// Copied at most once per idle moment, and only what changed since the last.
    pub fn unpin(&mut self) {
        if !std::mem::take(&mut self.borrowed) {
            return;
        }
        let own = |text: &mut Bytes| *text = Bytes::copy_from_slice(text);
        if let Some((_, text)) = self.previous.as_mut() {
            own(text);
        }
        if let Some(run) = self.run.as_mut() {
            own(&mut run.text);
            if let Some(parent) = run.parent.as_mut() {
                own(parent);
            }
        }
    }

    /// Ends the current run (the session ended, or a different statement came), reporting it if it was an
    /// episode.
    pub fn finish(&mut self, settings: &Settings, patterns: &Patterns, origin: &Origin<'_>) {
        let Some(run) = self.run.take() else { return };
        let Some(parent) = &run.parent else { return };
        if run.count < settings.threshold || run.distinct < 2 {
            return;
        }
        let normalized = fingerprint::canonical(&run.text);
        let parent = fingerprint::canonical(parent);
        let suggestion = suggest(&normalized);
        let elapsed = run.last.duration_since(run.started);
        let fingerprint = format!("{:016x}", run.shape);
        let samples = if settings.log_parameters {
            run.samples.join(" | ")
        } else {
            "(redacted; set nplus1.log_parameters to see them)".to_string()
        };
        tracing::warn!(
            fingerprint,
            normalized_sql = %normalized,
            count = run.count,
            total_ms = regions::millis(elapsed),
            parent = %parent,
            application_name = origin.application_name,
            user = origin.user,
            client = %origin.client,
            sample_parameters = %samples,
            suggestion,
            "N+1 query pattern: the same statement ran {} times in a row after its parent",
            run.count
        );
        patterns.add(
            run.shape,
            &fingerprint,
            normalized,
            parent,
            suggestion,
            run.count,
            elapsed,
            origin,
        );
    }
}

/// The fix to suggest for a repeated statement: a lookup by one value becomes one query for all the values;
/// anything else, a join or eager loading.
pub fn suggest(normalized: &str) -> &'static str {
    let lower = normalized.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let parameters = bytes
        .windows(2)
        .filter(|w| w[0] == b'$' && w[1].is_ascii_digit())
        .count()
        + lower.matches('?').count();
    if parameters == 1 && lower.contains(" = ") && lower.starts_with("select") {
        "fetch them in one query: WHERE <column> = ANY($1) with an array of the values"
    } else {
        "load them together: a JOIN, or the ORM's eager loading (selectinload/joinedload, includes, prefetch_related)"
    }
}

/// An N+1 pattern, added up over its episodes.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub fingerprint: String,
    pub normalized: String,
    pub parent: String,
    pub suggestion: &'static str,
    pub episodes: u64,
    pub statements: u64,
    pub total: Duration,
    pub application_name: String,
    pub last_seen: SystemTime,
}

/// The top patterns, bounded, shared by all sessions.
#[derive(Default)]
pub struct Patterns {
    by_shape: Mutex<HashMap<u64, Pattern>>,
    labelled: Mutex<HashSet<u64>>,
}

impl Patterns {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        shape: u64,
        fingerprint: &str,
        normalized: String,
        parent: String,
        suggestion: &'static str,
        count: u32,
        elapsed: Duration,
        origin: &Origin<'_>,
    ) {
        let label = {
            let mut labelled = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
            if labelled.contains(&shape) || labelled.len() < MAX_LABELLED {
                labelled.insert(shape);
                fingerprint.to_string()
            } else {
                "other".to_string()
            }
        };
        METRICS.nplus1_episodes.with_label_values(&[&label]).inc();
        METRICS
            .nplus1_statements
            .with_label_values(&[&label])
            .inc_by(u64::from(count));
        let mut patterns = self.by_shape.lock().unwrap_or_else(|p| p.into_inner());
        if !patterns.contains_key(&shape) && patterns.len() >= MAX_PATTERNS {
            if let Some(rarest) = patterns
                .iter()
                .min_by_key(|(_, p)| p.episodes)
                .map(|(k, _)| *k)
            {
                patterns.remove(&rarest);
            }
        }
        let pattern = patterns.entry(shape).or_insert_with(|| Pattern {
            fingerprint: fingerprint.to_string(),
            normalized,
            parent,
            suggestion,
            episodes: 0,
            statements: 0,
            total: Duration::ZERO,
            application_name: origin.application_name.to_string(),
            last_seen: SystemTime::now(),
        });
        pattern.episodes += 1;
        pattern.statements += u64::from(count);
        pattern.total += elapsed;
        pattern.last_seen = SystemTime::now();
    }

    /// Every pattern, most episodes first.
    pub fn top(&self) -> Vec<Pattern> {
        let mut list: Vec<Pattern> = self
            .by_shape
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        list.sort_by(|a, b| {
            b.episodes
                .cmp(&a.episodes)
                .then(b.statements.cmp(&a.statements))
        });
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            enabled: true,
            threshold: 5,
            window: Duration::from_secs(1),
            log_parameters: false,
        }
    }

    fn origin() -> Origin<'static> {
        Origin {
            user: "u",
            application_name: "app",
            client: "127.0.0.1:1".parse().unwrap(),
        }
    }

    /// What the detector keeps while the client idles is its own: no slice of the buffer the statements came
    /// in holds that buffer's allocation.
    #[test]
    fn kept_texts_let_go_of_the_read_buffer_when_the_client_idles() {
        let patterns = Patterns::default();
        let buffer = Bytes::from(b"UPDATE t SET a = 1SELECT * FROM t WHERE id = 1".to_vec());
        let inside = |text: &Bytes| buffer.as_ptr_range().contains(&text.as_ptr());
        let mut detector = Detector::default();
        for (range, read) in [(0..18, false), (18..buffer.len(), true)] {
            let text = buffer.slice(range);
            detector.observe(
                Statement {
                    shape: fingerprint::shape(&text).hash,
                    read,
                    text: &text,
                    values: 1,
                    sample: None,
                    at: Instant::now(),
                },
                &settings(),
                &patterns,
                &origin(),
            );
        }
        let run = detector.run.as_ref().expect("a run started");
        assert!(inside(&run.text) && inside(run.parent.as_ref().expect("its parent")));
        detector.unpin();
        let run = detector.run.as_ref().unwrap();
        assert!(!inside(&run.text), "the run's text");
        assert!(!inside(run.parent.as_ref().unwrap()), "its parent");
        assert!(
            !inside(&detector.previous.as_ref().unwrap().1),
            "the previous statement"
        );
        assert_eq!(&run.text[..], b"SELECT * FROM t WHERE id = 1");
    }

    fn run(detector: &mut Detector, patterns: &Patterns, sql: &str, values: u64) {
        let text = Bytes::from(sql.to_string());
        detector.observe(
            Statement {
                shape: fingerprint::shape(sql.as_bytes()).hash,
                read: sql.to_ascii_lowercase().starts_with("select"),
                text: &text,
                values,
                sample: None,
                at: Instant::now(),
            },
            &settings(),
            patterns,
            &origin(),
        );
    }

    #[test]
    fn a_loop_after_a_parent_is_an_episode() {
        let patterns = Patterns::default();
        let mut detector = Detector::default();
        run(
            &mut detector,
            &patterns,
            "SELECT * FROM orders WHERE customer = 1",
            0,
        );
        for id in 0..7 {
            run(
                &mut detector,
                &patterns,
                &format!("SELECT * FROM items WHERE order_id = {id}"),
                id,
            );
        }
        detector.finish(&settings(), &patterns, &origin());
        let top = patterns.top();
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].statements, 7);
        assert_eq!(top[0].normalized, "SELECT * FROM items WHERE order_id = ?");
        assert!(top[0].parent.contains("FROM orders"));
        assert!(top[0].suggestion.contains("ANY($1)"));
        assert!(
            suggest("SELECT * FROM orders WHERE $1::INTEGER = orders.customer_id")
                .contains("ANY($1)")
        );
        assert!(suggest("SELECT * FROM t WHERE a = $1 AND b = $2").contains("JOIN"));
    }

    #[test]
    fn a_loop_of_inserts_is_not() {
        let patterns = Patterns::default();
        let mut detector = Detector::default();
        run(&mut detector, &patterns, "SELECT 1 FROM parent", 0);
        for id in 0..10 {
            run(
                &mut detector,
                &patterns,
                &format!("INSERT INTO t VALUES ({id})"),
                id,
            );
        }
        detector.finish(&settings(), &patterns, &origin());
        assert!(patterns.top().is_empty());
    }

    #[test]
    fn a_hot_statement_without_a_parent_is_not() {
        let patterns = Patterns::default();
        let mut detector = Detector::default();
        for id in 0..50 {
            run(
                &mut detector,
                &patterns,
                &format!("SELECT abalance FROM pgbench_accounts WHERE aid = {id}"),
                id,
            );
        }
        detector.finish(&settings(), &patterns, &origin());
        assert!(patterns.top().is_empty());
    }

    #[test]
    fn short_runs_and_repeated_values_are_not() {
        let patterns = Patterns::default();
        let mut detector = Detector::default();
        run(&mut detector, &patterns, "SELECT 1 FROM parent", 0);
        for id in 0..4 {
            run(
                &mut detector,
                &patterns,
                &format!("SELECT * FROM t WHERE id = {id}"),
                id,
            );
        }
        run(&mut detector, &patterns, "SELECT 1 FROM parent", 0);
        for _ in 0..10 {
            run(&mut detector, &patterns, "SELECT * FROM t WHERE id = 1", 1);
        }
        detector.finish(&settings(), &patterns, &origin());
        assert!(patterns.top().is_empty());
    }
}
