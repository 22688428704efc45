//! Metrics that change on every request, kept per thread.
//!
//! The `prometheus` crate's counters and histograms are shared atomics: each increment is a locked
//! read-modify-write, four of them per histogram observation, on cache lines every worker thread writes. A
//! transaction through the gateway touched such metrics about ten times. Here each thread owns a shard (its own
//! cache lines) and updates it with a plain load and store; a scrape adds the shards up. Threads beyond the
//! owned shards share one more, updated with atomic adds, so any number of threads stays correct.

use prometheus::core::{Collector, Desc};
use prometheus::proto;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Shards owned by one thread each; shard `OWNED` is shared by the threads after them.
const OWNED: usize = 8;

/// This thread's shard.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SHARD: usize = NEXT.fetch_add(1, Relaxed).min(OWNED));
    SHARD.with(|s| *s)
}

/// Adds `n` to a cell of shard `shard`: a load and a store when the thread owns the shard (it is the only
/// writer), an atomic add otherwise.
fn add(cell: &AtomicU64, shard: usize, n: u64) {
    if shard < OWNED {
        cell.store(cell.load(Relaxed).wrapping_add(n), Relaxed);
    } else {
        cell.fetch_add(n, Relaxed);
    }
}

/// Cells on cache lines of their own (128 bytes: adjacent-line prefetch pairs lines), so that no two shards
/// share a line.
#[repr(align(128))]
struct Line([AtomicU64; 16]);

/// One shard's cells.
struct Cells(Box<[Line]>);

impl Cells {
    fn cell(&self, i: usize) -> &AtomicU64 {
        &self.0[i / 16].0[i % 16]
    }
}

fn shards(cells: usize) -> Box<[Cells]> {
    (0..=OWNED)
        .map(|_| {
            Cells(
                (0..cells.div_ceil(16))
                    .map(|_| Line(std::array::from_fn(|_| AtomicU64::new(0))))
                    .collect(),
            )
        })
        .collect()
}

fn sum(shards: &[Cells], cell: usize) -> u64 {
    shards.iter().fold(0u64, |total, s| {
        total.wrapping_add(s.cell(cell).load(Relaxed))
    })
}

/// Registers a metric that the caller keeps using.
pub fn register<T: Collector + 'static>(registry: &prometheus::Registry, metric: &Arc<T>) {
    struct Shared<T>(Arc<T>);
    impl<T: Collector> Collector for Shared<T> {
        fn desc(&self) -> Vec<&Desc> {
            self.0.desc()
        }
        fn collect(&self) -> Vec<proto::MetricFamily> {
            self.0.collect()
        }
    }
    registry
        .register(Box::new(Shared(metric.clone())))
        .expect("unique metric");
}

fn label_pair(name: &str, value: &str) -> proto::LabelPair {
    let mut pair = proto::LabelPair::default();
    pair.set_name(name.to_string());
    pair.set_value(value.to_string());
    pair
}

fn family(
    desc: &Desc,
    kind: proto::MetricType,
    metrics: Vec<proto::Metric>,
) -> Vec<proto::MetricFamily> {
    let mut family = proto::MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(kind);
    family.set_metric(metrics);
    vec![family]
}

/// A counter without labels.
pub struct Counter {
    desc: Desc,
    shards: Box<[Cells]>,
}

impl Counter {
    pub fn new(name: &str, help: &str) -> Counter {
        Counter {
            desc: Desc::new(name.into(), help.into(), Vec::new(), HashMap::new())
                .expect("valid metric"),
            shards: shards(1),
        }
    }

    pub fn inc(&self) {
        let shard = shard();
        add(self.shards[shard].cell(0), shard, 1);
    }

    pub fn get(&self) -> u64 {
        sum(&self.shards, 0)
    }
}

impl Collector for Counter {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let mut counter = proto::Counter::default();
        counter.set_value(self.get() as f64);
        let mut metric = proto::Metric::default();
        metric.set_counter(counter);
        family(&self.desc, proto::MetricType::COUNTER, vec![metric])
    }
}

/// A histogram with one series per value of its label (or one series without a label). Per shard and series:
/// a count per bucket (the last one past every bound) and the sum as f64 bits; the series' count is the sum
/// of its buckets.
pub struct Histograms {
    desc: Desc,
    label: Option<(String, Vec<String>)>,
    bounds: Box<[f64]>,
    shards: Box<[Cells]>,
}

impl Histograms {
    /// `label`: the label's name and its values, one series each; `observe` takes the value's index.
    pub fn new(
        name: &str,
        help: &str,
        bounds: &[f64],
        label: Option<(&str, &[&str])>,
    ) -> Histograms {
        let series = label.map_or(1, |(_, values)| values.len());
        Histograms {
            desc: Desc::new(
                name.into(),
                help.into(),
                label.iter().map(|(name, _)| name.to_string()).collect(),
                HashMap::new(),
            )
            .expect("valid metric"),
            label: label.map(|(name, values)| {
                (
                    name.to_string(),
                    values.iter().map(|v| v.to_string()).collect(),
                )
            }),
            bounds: bounds.into(),
            shards: shards(series * (bounds.len() + 2)),
        }
    }

    fn width(&self) -> usize {
        self.bounds.len() + 2
    }

    /// Adds a zero to series `series`: one cell, no bucket to search and nothing to add to the sum (a
    /// checkout that found a free slot, nearly every one).
    pub fn observe_zero(&self, series: usize) {
        let shard = shard();
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| 0.0 <= bound)
            .unwrap_or(self.bounds.len());
        add(
            self.shards[shard].cell(series * self.width() + bucket),
            shard,
            1,
        );
    }

    /// Adds `value` to series `series`.
    pub fn observe(&self, series: usize, value: f64) {
        let shard = shard();
        let cells = &self.shards[shard];
        let base = series * self.width();
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        add(cells.cell(base + bucket), shard, 1);
        let sum = cells.cell(base + self.bounds.len() + 1);
        if shard < OWNED {
            sum.store(
                (f64::from_bits(sum.load(Relaxed)) + value).to_bits(),
                Relaxed,
            );
        } else {
            let _ = sum.fetch_update(Relaxed, Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
        }
    }

    /// How many values series `series` has seen, and their sum.
    pub fn totals(&self, series: usize) -> (u64, f64) {
        let histogram = self.series_proto(series);
        (histogram.get_sample_count(), histogram.get_sample_sum())
    }

    fn series_proto(&self, series: usize) -> proto::Histogram {
        let base = series * self.width();
        let mut histogram = proto::Histogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (i, &bound) in self.bounds.iter().enumerate() {
            cumulative += sum(&self.shards, base + i);
            let mut bucket = proto::Bucket::default();
            bucket.set_cumulative_count(cumulative);
            bucket.set_upper_bound(bound);
            buckets.push(bucket);
        }
        histogram.set_bucket(buckets);
        histogram.set_sample_count(cumulative + sum(&self.shards, base + self.bounds.len()));
        histogram.set_sample_sum(
            self.shards
                .iter()
                .map(|s| f64::from_bits(s.cell(base + self.bounds.len() + 1).load(Relaxed)))
                .sum(),
        );
        histogram
    }
}

impl Collector for Histograms {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let metrics = match &self.label {
            None => {
                let mut metric = proto::Metric::default();
                metric.set_histogram(self.series_proto(0));
                vec![metric]
            }
            Some((name, values)) => values
                .iter()
                .enumerate()
                .map(|(series, value)| {
                    let mut metric = proto::Metric::from_label(vec![label_pair(name, value)]);
                    metric.set_histogram(self.series_proto(series));
                    metric
                })
                .collect(),
        };
        family(&self.desc, proto::MetricType::HISTOGRAM, metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_add_up_owned_and_shared_shards_alike() {
        let counter = Arc::new(Counter::new("c_total", "help"));
        let histograms = Arc::new(Histograms::new(
            "h_seconds",
            "help",
            &[0.1, 1.0],
            Some(("role", &["primary", "replica"])),
        ));
        // More threads than owned shards, so that some share the last one.
        let threads: Vec<_> = (0..OWNED + 4)
            .map(|t| {
                let (counter, histograms) = (counter.clone(), histograms.clone());
                std::thread::spawn(move || {
                    for i in 0..999 {
                        counter.inc();
                        histograms.observe(t % 2, [0.05, 0.5, 5.0][i % 3]);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let total = ((OWNED + 4) * 999) as u64;
        assert_eq!(counter.get(), total);
        let family = histograms.collect().remove(0);
        assert_eq!(family.get_metric().len(), 2);
        let mut count = 0;
        for metric in family.get_metric() {
            let histogram = metric.get_histogram();
            count += histogram.get_sample_count();
            let buckets = histogram.get_bucket();
            // Of each thread's observations a third is in each bucket; the last third is past both bounds.
            assert_eq!(
                buckets[1].cumulative_count() * 3,
                histogram.get_sample_count() * 2
            );
            assert_eq!(
                buckets[0].cumulative_count() * 3,
                histogram.get_sample_count()
            );
        }
        assert_eq!(count, total);
    }

    #[test]
    fn a_zero_counts_as_observe_would_count_it() {
        let bounds = [0.0005, 0.1];
        let fast = Histograms::new("fast_seconds", "help", &bounds, None);
        let slow = Histograms::new("slow_seconds", "help", &bounds, None);
        for _ in 0..3 {
            fast.observe_zero(0);
            slow.observe(0, 0.0);
        }
        fast.observe(0, 0.05);
        slow.observe(0, 0.05);
        let (a, b) = (fast.series_proto(0), slow.series_proto(0));
        assert_eq!(a.get_sample_count(), 4);
        assert_eq!(a.get_sample_sum(), b.get_sample_sum());
        let counts = |h: &proto::Histogram| {
            h.get_bucket()
                .iter()
                .map(|b| b.cumulative_count())
                .collect::<Vec<_>>()
        };
        assert_eq!(counts(&a), counts(&b));
        assert_eq!(counts(&a), vec![3, 4]);
    }
}
