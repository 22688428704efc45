//! Per-replica gauges. The gateway registers [`collectors`] in its registry; labels are the configured
//! replicas and regions, so their number is bounded by the configuration.

use crate::picture::ReplicaStatus;
use prometheus::{GaugeVec, IntGauge, IntGaugeVec, Opts};
use std::sync::LazyLock;

pub static LAG_SECONDS: LazyLock<GaugeVec> = LazyLock::new(|| {
    GaugeVec::new(
        Opts::new(
            "regiongate_replica_lag_seconds",
            "Replication lag: 0 when caught up, else the age of the newest replayed heartbeat",
        ),
        &["replica", "region"],
    )
    .expect("valid metric")
});
pub static LAG_BYTES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new(
            "regiongate_replica_lag_bytes",
            "WAL bytes the replica has yet to replay",
        ),
        &["replica", "region"],
    )
    .expect("valid metric")
});
pub static RTT_SECONDS: LazyLock<GaugeVec> = LazyLock::new(|| {
    GaugeVec::new(
        Opts::new(
            "regiongate_replica_rtt_seconds",
            "Smoothed round-trip time of the replica's probes",
        ),
        &["replica", "region"],
    )
    .expect("valid metric")
});
pub static UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new(
            "regiongate_replica_up",
            "1 when the replica answered its last probe and is not banned",
        ),
        &["replica", "region"],
    )
    .expect("valid metric")
});
pub static PRIMARY_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    IntGauge::new(
        "regiongate_primary_up",
        "1 when the last heartbeat write on the primary succeeded",
    )
    .expect("valid metric")
});

pub static WRITER_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    IntGauge::new(
        "regiongate_writer_up",
        "1 when exactly one node is out of recovery and takes writes; 0 when none is, or two are (split brain)",
    )
    .expect("valid metric")
});
pub static FAILOVERS: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    prometheus::IntCounter::new(
        "regiongate_failovers_total",
        "Times writes moved to another node, because it was promoted",
    )
    .expect("valid metric")
});
pub static NODE_ROLE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new(
            "regiongate_node_role",
            "1 for the role each configured node reported at its last probe (primary, standby, down, unknown)",
        ),
        &["node", "role"],
    )
    .expect("valid metric")
});
pub static NODE_TIMELINE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new(
            "regiongate_node_timeline",
            "The timeline each node writes (primary) or receives (standby), as last known",
        ),
        &["node"],
    )
    .expect("valid metric")
});

/// Everything this crate measures, for the gateway's registry.
pub fn collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    vec![
        Box::new(LAG_SECONDS.clone()),
        Box::new(LAG_BYTES.clone()),
        Box::new(RTT_SECONDS.clone()),
        Box::new(UP.clone()),
        Box::new(PRIMARY_UP.clone()),
        Box::new(WRITER_UP.clone()),
        Box::new(FAILOVERS.clone()),
        Box::new(NODE_ROLE.clone()),
        Box::new(NODE_TIMELINE.clone()),
    ]
}

pub(crate) fn observe(status: &ReplicaStatus) {
    let replica = status.url.to_string();
    let labels = [replica.as_str(), &*status.region];
    UP.with_label_values(&labels).set(i64::from(
        status.up
            && status
                .banned_until
                .is_none_or(|u| u <= std::time::Instant::now()),
    ));
    if let Some(lag) = status.lag {
        LAG_SECONDS
            .with_label_values(&labels)
            .set(lag.as_secs_f64());
    }
    if let Some(bytes) = status.lag_bytes {
        LAG_BYTES.with_label_values(&labels).set(bytes as i64);
    }
    if let Some(rtt) = status.rtt {
        RTT_SECONDS
            .with_label_values(&labels)
            .set(rtt.as_secs_f64());
    }
}

pub(crate) fn node_role(url: &crate::ServerUrl, role: crate::Role, timeline: Option<u32>) {
    let node = url.to_string();
    for other in [
        crate::Role::Unknown,
        crate::Role::Primary,
        crate::Role::Standby,
        crate::Role::Down,
    ] {
        NODE_ROLE
            .with_label_values(&[&node, other.label()])
            .set(i64::from(other == role));
    }
    if let Some(timeline) = timeline {
        NODE_TIMELINE
            .with_label_values(&[&node])
            .set(i64::from(timeline));
    }
}
