//! A view as the configuration declares it, and its validation. The gateway's YAML has a `views:` list of
//! these; parsing and checking happen here so that the gateway's config module only embeds the list.

use crate::schedule::Schedule;
use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// Most views a configuration may declare: routing keeps "which views a statement reads" in a 64-bit set.
pub const MAX_VIEWS: usize = 64;

/// One materialized view.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewSpec {
    /// The view's name, optionally schema-qualified (`reporting.daily_sales`); plain lower-case identifiers.
    pub name: String,
    /// The defining SELECT. Without `query` or `query_file` the view must already exist (made by a migration):
    /// the gateway only refreshes it.
    #[serde(default)]
    pub query: Option<String>,
    /// A file holding the defining SELECT, relative to the working directory.
    #[serde(default)]
    pub query_file: Option<std::path::PathBuf>,
    /// `every 5m` or a cron expression.
    #[serde(deserialize_with = "schedule")]
    pub schedule: Schedule,
    /// How old a replica's copy may be for reads of the view to go there; defaults to twice the schedule's
    /// period.
    #[serde(default, deserialize_with = "optional_duration")]
    pub max_staleness: Option<Duration>,
    /// Columns that identify a row: the gateway creates a unique index on them, which lets refreshes run
    /// CONCURRENTLY (readers are never blocked).
    #[serde(default)]
    pub unique_key: Vec<String>,
    /// A refresh running longer is cancelled (statement_timeout) and counted as failed.
    #[serde(default = "default_refresh_timeout", deserialize_with = "duration")]
    pub refresh_timeout: Duration,
}

fn default_refresh_timeout() -> Duration {
    Duration::from_secs(600)
}

impl PartialEq for ViewSpec {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

impl ViewSpec {
    /// The staleness reads of this view accept.
    pub fn max_staleness(&self) -> Duration {
        self.max_staleness
            .unwrap_or_else(|| self.schedule.period() * 2)
    }

    /// The name as SQL: each part double-quoted (validation allows only plain identifiers, so no escaping).
    pub fn quoted_name(&self) -> String {
        self.name
            .split('.')
            .map(|part| format!("\"{part}\""))
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The unqualified name (what statements usually say).
    pub fn relation(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }

    /// The schema part, `public` when unqualified.
    pub fn schema(&self) -> &str {
        match self.name.split_once('.') {
            Some((schema, _)) => schema,
            None => "public",
        }
    }

    /// The defining query, from `query` or `query_file`; `None` when a migration defines the view.
    pub fn defining_query(&self) -> std::io::Result<Option<String>> {
        match (&self.query, &self.query_file) {
            (Some(query), _) => Ok(Some(query.clone())),
            (None, Some(file)) => std::fs::read_to_string(file).map(Some),
            (None, None) => Ok(None),
        }
    }
}

fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && text.len() < 64
}

/// Checks a `views:` list; the error names the key (`views[2].unique_key`) and what is wrong.
pub fn validate(views: &[ViewSpec]) -> Result<(), (String, String)> {
    if views.len() > MAX_VIEWS {
        return Err((
            "views".into(),
            format!("{} views; at most {MAX_VIEWS}", views.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, view) in views.iter().enumerate() {
        let key = |field: &str| format!("views[{i}].{field}");
        let parts: Vec<&str> = view.name.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| is_identifier(p)) {
            return Err((
                key("name"),
                format!(
                    "{:?} is not a lower-case identifier (optionally schema.name)",
                    view.name
                ),
            ));
        }
        if !seen.insert((view.schema().to_string(), view.relation().to_string())) {
            return Err((key("name"), format!("{:?} is declared twice", view.name)));
        }
        if view.query.is_some() && view.query_file.is_some() {
            return Err((key("query"), "give query or query_file, not both".into()));
        }
        if let Some(file) = &view.query_file {
            if let Err(e) = std::fs::metadata(file) {
                return Err((key("query_file"), format!("{}: {e}", file.display())));
            }
        }
        if let Some(column) = view.unique_key.iter().find(|c| !is_identifier(c)) {
            return Err((
                key("unique_key"),
                format!("{column:?} is not a lower-case identifier"),
            ));
        }
        if view.max_staleness.is_some_and(|s| s.is_zero()) {
            return Err((key("max_staleness"), "must be more than 0".into()));
        }
        if view.refresh_timeout.is_zero() {
            return Err((key("refresh_timeout"), "must be more than 0".into()));
        }
    }
    Ok(())
}

fn schedule<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Schedule, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
}

fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Vec<ViewSpec> {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn a_view_with_defaults() {
        let views =
            parse("- { name: reporting.daily, query: 'SELECT 1 AS x', schedule: every 30s }");
        validate(&views).unwrap();
        let view = &views[0];
        assert_eq!(view.max_staleness(), Duration::from_secs(60));
        assert_eq!(view.quoted_name(), "\"reporting\".\"daily\"");
        assert_eq!((view.schema(), view.relation()), ("reporting", "daily"));
        assert_eq!(view.refresh_timeout, Duration::from_secs(600));
    }

    #[test]
    fn bad_views_name_the_key() {
        let cases = [
            ("- { name: Daily, schedule: every 1m }", "views[0].name"),
            (
                "- { name: a, schedule: every 1m }\n- { name: public.a, schedule: every 1m }",
                "views[1].name",
            ),
            (
                "- { name: a, schedule: every 1m, unique_key: [\"x; drop\"] }",
                "views[0].unique_key",
            ),
            (
                "- { name: a, schedule: every 1m, query: x, query_file: y }",
                "views[0].query",
            ),
            (
                "- { name: a, schedule: every 1m, max_staleness: 0s }",
                "views[0].max_staleness",
            ),
        ];
        for (yaml, key) in cases {
            assert_eq!(validate(&parse(yaml)).unwrap_err().0, key, "{yaml}");
        }
        let unknown = serde_norway::from_str::<Vec<ViewSpec>>(
            "- { name: a, schedule: every 1m, colour: red }",
        );
        assert!(unknown.unwrap_err().to_string().contains("colour"));
    }
}
