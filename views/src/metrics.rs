//! View metrics. The gateway registers [`collectors`] in its registry; the `view` label takes configured view
//! names and `region` configured regions, so both are bounded by the configuration.

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts};
use std::sync::LazyLock;

pub static STALENESS_SECONDS: LazyLock<GaugeVec> = LazyLock::new(|| {
    GaugeVec::new(
        Opts::new(
            "regiongate_view_staleness_seconds",
            "Age of the newest refresh of a view that a region's replica (or the primary) has replayed, when last read",
        ),
        &["view", "region"],
    )
    .expect("valid metric")
});
pub static REFRESH_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        HistogramOpts::new(
            "regiongate_view_refresh_seconds",
            "Duration of successful view refreshes",
        )
        .buckets(vec![
            0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
        ]),
        &["view"],
    )
    .expect("valid metric")
});
pub static REFRESH_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "regiongate_view_refresh_failures_total",
            "View refreshes that failed (each retry counts)",
        ),
        &["view"],
    )
    .expect("valid metric")
});
pub static REFRESHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "regiongate_view_refreshes_total",
            "Scheduled and manual refresh attempts, by outcome (refreshed, already-done, busy, failed)",
        ),
        &["view", "outcome"],
    )
    .expect("valid metric")
});

/// Everything above, for the gateway's registry.
pub fn collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    vec![
        Box::new(STALENESS_SECONDS.clone()),
        Box::new(REFRESH_SECONDS.clone()),
        Box::new(REFRESH_FAILURES.clone()),
        Box::new(REFRESHES.clone()),
    ]
}
