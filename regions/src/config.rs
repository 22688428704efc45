//! The configuration sections about where servers are and how reads are routed: `primary`, `home_region`,
//! `regions` and `routing` in the gateway's YAML file.

use crate::url::ServerUrl;
use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A PostgreSQL server: a URL string, or a map with the URL and its region.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub url: ServerUrl,
    pub region: Option<String>,
}

impl<'de> Deserialize<'de> for ServerSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Url(String),
            Map(ServerMap),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ServerMap {
            url: String,
            region: Option<String>,
        }
        let (url, region) = match Form::deserialize(deserializer)? {
            Form::Url(url) => (url, None),
            Form::Map(map) => (map.url, map.region),
        };
        let url = ServerUrl::parse(&url).map_err(serde::de::Error::custom)?;
        Ok(ServerSpec { url, region })
    }
}

/// A region and its read replicas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
    #[serde(default, deserialize_with = "urls")]
    pub replicas: Vec<ServerUrl>,
}

fn urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ServerUrl>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|u| ServerUrl::parse(u).map_err(serde::de::Error::custom))
        .collect()
}

/// Whether the primary serves reads in its own region (`routing.primary_reads`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrimaryReads {
    /// A gateway whose home region is the primary's reads from the primary when no replica of that region
    /// fits, before any other region is tried.
    #[default]
    Local,
    /// The primary serves reads only when no replica anywhere fits (`when_no_replica_fits: primary`).
    Never,
    /// The primary is one more replica of its region, for every gateway: tried in its region's turn, and
    /// chosen over that region's replicas when its round trip is shorter.
    Always,
}

/// What to do with a read when no replica is fresh enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenNoReplicaFits {
    /// Read from the primary (always fresh, maybe far).
    Primary,
    /// Refuse with SQLSTATE 57P03, naming the budget and each candidate's lag.
    Error,
}

/// What a read over its budget gets while no node takes writes (the primary is down, or two nodes are out of
/// recovery): replicas' data is then as old as the newest heartbeat they replayed, and grows older.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenPrimaryDown {
    /// The freshest reachable replica serves it, up to `outage_max_lag`, with a NOTICE saying how stale.
    #[default]
    ServeStale,
    /// Refused with SQLSTATE 57P03.
    Error,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    /// The staleness a read accepts by default.
    #[serde(with = "duration")]
    pub max_lag: Duration,
    /// After a session's write commits, its reads go only to replicas that have replayed it.
    pub read_your_writes: bool,
    pub when_no_replica_fits: WhenNoReplicaFits,
    pub when_primary_down: WhenPrimaryDown,
    /// The stalest data `when_primary_down: serve_stale` serves.
    #[serde(with = "duration")]
    pub outage_max_lag: Duration,
    pub primary_reads: PrimaryReads,
    /// Regions to try in this order; empty means home region first, then by measured round trip.
    pub region_order: Vec<String>,
    /// How often replicas are measured and the heartbeat is written.
    #[serde(with = "duration")]
    pub monitor_interval: Duration,
    /// How long a replica that refused or dropped a connection gets no reads (doubling while it keeps failing).
    #[serde(with = "duration")]
    pub ban_time: Duration,
    /// Functions (beyond the built-in list) whose calls make a statement a write.
    pub side_effect_functions: Vec<String>,
    /// Where transactions that may write start (see [`Transactions`]).
    pub transactions: Transactions,
    /// Budgets (and transaction routing) for particular users and databases.
    pub budgets: Vec<Budget>,
}

/// How transactions are routed: `routing.transactions: validated` (or `primary`), or a map with `mode` and
/// `max_replay_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transactions {
    pub mode: TransactionRouting,
    /// What a transaction on a replica may record for its replay on the primary; past it, a write in it is
    /// refused with 40001.
    pub max_replay_bytes: usize,
}

impl Default for Transactions {
    fn default() -> Self {
        Transactions {
            mode: TransactionRouting::Validated,
            max_replay_bytes: 64 << 10,
        }
    }
}

impl<'de> Deserialize<'de> for Transactions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Mode(TransactionRouting),
            Map(Map),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Map {
            mode: Option<TransactionRouting>,
            max_replay_bytes: Option<usize>,
        }
        let default = Transactions::default();
        Ok(match Form::deserialize(deserializer)? {
            Form::Mode(mode) => Transactions { mode, ..default },
            Form::Map(map) => Transactions {
                mode: map.mode.unwrap_or(default.mode),
                max_replay_bytes: map.max_replay_bytes.unwrap_or(default.max_replay_bytes),
            },
        })
    }
}

/// Where a transaction that may write starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransactionRouting {
    /// Where its first statement belongs; a replica's transaction moves to the primary at its first write,
    /// after its reads are run there again and found to answer the same.
    #[default]
    Validated,
    /// On the primary.
    Primary,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            max_lag: Duration::from_secs(1),
            read_your_writes: true,
            when_no_replica_fits: WhenNoReplicaFits::Primary,
            when_primary_down: WhenPrimaryDown::ServeStale,
            outage_max_lag: Duration::from_secs(300),
            primary_reads: PrimaryReads::Local,
            region_order: Vec::new(),
            monitor_interval: Duration::from_millis(250),
            ban_time: Duration::from_secs(5),
            side_effect_functions: Vec::new(),
            transactions: Transactions::default(),
            budgets: Vec::new(),
        }
    }
}

/// A staleness budget, or a transaction routing, for a user, a database, or both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub user: Option<String>,
    pub database: Option<String>,
    #[serde(default, with = "optional_duration")]
    pub max_lag: Option<Duration>,
    pub transactions: Option<TransactionRouting>,
}

impl Routing {
    /// The budget for a user and database: the most specific matching entry, else the default.
    pub fn budget_for(&self, user: &str, database: &str) -> Duration {
        self.most_specific(user, database, |b| b.max_lag)
            .unwrap_or(self.max_lag)
    }

    /// The transaction routing for a user and database: the most specific matching entry, else the default.
    pub fn transactions_for(&self, user: &str, database: &str) -> TransactionRouting {
        self.most_specific(user, database, |b| b.transactions)
            .unwrap_or(self.transactions.mode)
    }

    fn most_specific<T>(
        &self,
        user: &str,
        database: &str,
        field: impl Fn(&Budget) -> Option<T>,
    ) -> Option<T> {
        let matches = |b: &&Budget| {
            b.user.as_deref().is_none_or(|u| u == user)
                && b.database.as_deref().is_none_or(|d| d == database)
        };
        self.budgets
            .iter()
            .filter(matches)
            .filter_map(|b| {
                Some((
                    b.user.is_some() as u8 + b.database.is_some() as u8,
                    field(b)?,
                ))
            })
            .max_by_key(|(specific, _)| *specific)
            .map(|(_, value)| value)
    }
}

mod optional_duration {
    use serde::Deserializer;
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

/// Human durations: "250ms", "5s", "1m 30s".
pub mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim())
            .map_err(|e| format!("invalid duration {text:?} ({e}); write e.g. \"250ms\" or \"5s\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_pick_the_most_specific_entry() {
        let routing: Routing = serde_norway::from_str(
            "max_lag: 1s\nbudgets:\n  - { user: a, max_lag: 5s }\n  - { user: a, database: d, max_lag: 9s }\n  - { database: d, max_lag: 2s }\n",
        )
        .unwrap();
        assert_eq!(routing.budget_for("a", "x"), Duration::from_secs(5));
        assert_eq!(routing.budget_for("a", "d"), Duration::from_secs(9));
        assert_eq!(routing.budget_for("b", "d"), Duration::from_secs(2));
        assert_eq!(routing.budget_for("b", "x"), Duration::from_secs(1));
    }

    #[test]
    fn transaction_routing_is_a_mode_or_a_map_and_per_user_like_budgets() {
        let routing: Routing = serde_norway::from_str(
            "transactions: primary\nbudgets:\n  - { user: a, max_lag: 5s }\n  - { user: b, transactions: validated }\n",
        )
        .unwrap();
        assert_eq!(routing.transactions.mode, TransactionRouting::Primary);
        assert_eq!(routing.transactions.max_replay_bytes, 64 << 10);
        assert_eq!(
            routing.transactions_for("a", "x"),
            TransactionRouting::Primary
        );
        assert_eq!(
            routing.transactions_for("b", "x"),
            TransactionRouting::Validated
        );
        assert_eq!(routing.budget_for("b", "x"), Duration::from_secs(1));
        let routing: Routing =
            serde_norway::from_str("transactions: { max_replay_bytes: 1000 }\n").unwrap();
        assert_eq!(
            routing.transactions,
            Transactions {
                mode: TransactionRouting::Validated,
                max_replay_bytes: 1000
            }
        );
        assert!(serde_norway::from_str::<Routing>("transactions: sometimes\n").is_err());
    }

    #[test]
    fn regions_parse() {
        let regions: Vec<Region> = serde_norway::from_str(
            "- { name: eu-west, replicas: [ 'postgres://h1:5432/app' ] }\n- { name: ap-south, replicas: [ 'postgres://h2/app', 'postgres://h3/app' ] }\n",
        )
        .unwrap();
        assert_eq!(regions[1].replicas.len(), 2);
        assert!(
            serde_norway::from_str::<Vec<Region>>("- { name: x, replicas: [ 'nope' ] }").is_err()
        );
    }
}
