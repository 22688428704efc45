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

/// What to do with a read when no replica is fresh enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenNoReplicaFits {
    /// Read from the primary (always fresh, maybe far).
    Primary,
    /// Refuse with SQLSTATE 57P03, naming the budget and each candidate's lag.
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
    /// Budgets for particular users and databases.
    pub budgets: Vec<Budget>,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            max_lag: Duration::from_secs(1),
            read_your_writes: true,
            when_no_replica_fits: WhenNoReplicaFits::Primary,
            region_order: Vec::new(),
            monitor_interval: Duration::from_millis(250),
            ban_time: Duration::from_secs(5),
            side_effect_functions: Vec::new(),
            budgets: Vec::new(),
        }
    }
}

/// A staleness budget for a user, a database, or both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub user: Option<String>,
    pub database: Option<String>,
    #[serde(with = "duration")]
    pub max_lag: Duration,
}

impl Routing {
    /// The budget for a user and database: the most specific matching entry, else the default.
    pub fn budget_for(&self, user: &str, database: &str) -> Duration {
        let matches = |b: &&Budget| {
            b.user.as_deref().is_none_or(|u| u == user)
                && b.database.as_deref().is_none_or(|d| d == database)
        };
        self.budgets
            .iter()
            .filter(matches)
            .max_by_key(|b| b.user.is_some() as u8 + b.database.is_some() as u8)
            .map(|b| b.max_lag)
            .unwrap_or(self.max_lag)
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
