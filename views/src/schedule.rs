//! When a view is refreshed: `every 5m` (runs at multiples of the period since the Unix epoch, UTC) or a cron
//! expression (`*/5 * * * *`, minute hour day-of-month month day-of-week, in UTC; a sixth leading field gives
//! seconds).
//!
//! A run is named by its *slot*, the instant it was scheduled for. Slots come from the wall clock and the
//! schedule only, so every gateway computes the same slots whatever moment it started or its timer fired: that
//! is what lets several gateways agree that a run is done (the history table holds one success per slot).

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A parsed schedule.
#[derive(Clone, Debug)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<cron::Schedule>, String),
}

/// Why a schedule string was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0:?}: expected `every <duration>` (like `every 5m`) or a cron expression (like `*/5 * * * *`)")]
    Syntax(String),
    #[error("{0:?}: {1}")]
    Duration(String, humantime::DurationError),
    #[error("{0:?}: the period must be at least 1s")]
    TooShort(String),
    /// The expression as the user wrote it, and the field the parser stopped at, if it says.
    #[error("{0:?} is not a valid cron expression (5 fields: minute hour day-of-month month day-of-week, in UTC; or 6, with seconds first){field}", field = field_named(.1))]
    Cron(String, Option<String>),
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Schedule, ScheduleError> {
        let trimmed = text.trim();
        if let Some(period) = trimmed.strip_prefix("every ") {
            let period = humantime::parse_duration(period.trim())
                .map_err(|e| ScheduleError::Duration(text.to_string(), e))?;
            if period < Duration::from_secs(1) {
                return Err(ScheduleError::TooShort(text.to_string()));
            }
            return Ok(Schedule::Every(period));
        }
        let fields = trimmed.split_whitespace().count();
        // The cron crate wants a seconds field first; the usual five-field form runs at second 0.
        let expression = match fields {
            5 => format!("0 {trimmed}"),
            6 => trimmed.to_string(),
            _ => return Err(ScheduleError::Syntax(text.to_string())),
        };
        let schedule = cron::Schedule::from_str(&expression).map_err(|e| {
            let added = expression.len() - trimmed.len();
            ScheduleError::Cron(
                text.to_string(),
                failed_field(&e.to_string(), added, trimmed),
            )
        })?;
        Ok(Schedule::Cron(Box::new(schedule), trimmed.to_string()))
    }
}

fn field_named(field: &Option<String>) -> String {
    field
        .as_ref()
        .map(|f| format!(": the field {f:?} is wrong"))
        .unwrap_or_default()
}

/// The field of `written` where the cron parser stopped: its error shows the expression it parsed (`written`
/// after `added` bytes of its own) with a caret under the place on the next line.
fn failed_field(error: &str, added: usize, written: &str) -> Option<String> {
    let caret = error.lines().nth(1)?.find('^')?;
    let at = caret
        .checked_sub(added)?
        .min(written.len().saturating_sub(1));
    if !written.is_char_boundary(at) {
        return None;
    }
    let start = written[..at]
        .rfind(char::is_whitespace)
        .map_or(0, |i| i + 1);
    let end = written[at..]
        .find(char::is_whitespace)
        .map_or(written.len(), |i| at + i);
    (start < end).then(|| written[start..end].to_string())
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Every(period) => write!(f, "every {}", humantime::format_duration(*period)),
            Schedule::Cron(_, text) => f.write_str(text),
        }
    }
}

impl Schedule {
    /// The first slot strictly after `after`; `None` when a cron expression never fires again.
    pub fn next_slot(&self, after: SystemTime) -> Option<SystemTime> {
        match self {
            Schedule::Every(period) => {
                let since_epoch = after.duration_since(UNIX_EPOCH).unwrap_or_default();
                let period_ns = period.as_nanos().max(1);
                let next = (since_epoch.as_nanos() / period_ns + 1) * period_ns;
                let secs = u64::try_from(next / 1_000_000_000).ok()?;
                let nanos = (next % 1_000_000_000) as u32;
                Some(UNIX_EPOCH + Duration::new(secs, nanos))
            }
            Schedule::Cron(schedule, _) => {
                let after: chrono::DateTime<chrono::Utc> = after.into();
                schedule.after(&after).next().map(SystemTime::from)
            }
        }
    }

    /// The typical time between runs, for the default `max_staleness` (twice this).
    pub fn period(&self) -> Duration {
        match self {
            Schedule::Every(period) => *period,
            Schedule::Cron(schedule, _) => {
                let mut upcoming = schedule.upcoming(chrono::Utc).take(2);
                match (upcoming.next(), upcoming.next()) {
                    (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::from_secs(60)),
                    _ => Duration::from_secs(60),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn cron_errors_show_the_expression_as_written() {
        let error = "*/5 * * * funday"
            .parse::<Schedule>()
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("\"*/5 * * * funday\" is not a valid cron expression"),
            "{error}"
        );
        assert!(
            !error.contains("0 */5"),
            "the internal six-field form leaked: {error}"
        );
        assert!(error.contains("\"funday\""), "{error}");
        let error = "0 61 * * * *".parse::<Schedule>().unwrap_err().to_string();
        assert!(error.contains("\"0 61 * * * *\""), "{error}");
    }

    #[test]
    fn every_slots_are_aligned_to_the_epoch_so_gateways_agree() {
        let s: Schedule = "every 5m".parse().unwrap();
        // Two gateways whose timers fire at different moments in the same period see the same next slot.
        assert_eq!(s.next_slot(at(1_000_000_001)), Some(at(1_000_000_200)));
        assert_eq!(s.next_slot(at(1_000_000_199)), Some(at(1_000_000_200)));
        // Strictly after: a slot is never returned twice.
        assert_eq!(s.next_slot(at(1_000_000_200)), Some(at(1_000_000_500)));
        assert_eq!(s.period(), Duration::from_secs(300));
    }

    #[test]
    fn five_field_cron_runs_at_second_zero_in_utc() {
        let s: Schedule = "*/15 * * * *".parse().unwrap();
        // 2026-01-01T00:07:30Z → 00:15:00Z.
        let start = at(1_767_225_600 + 7 * 60 + 30);
        assert_eq!(s.next_slot(start), Some(at(1_767_225_600 + 15 * 60)));
        assert_eq!(s.period(), Duration::from_secs(900));
        assert_eq!(s.to_string(), "*/15 * * * *");
    }

    #[test]
    fn bad_schedules_are_refused_with_the_text() {
        for bad in [
            "every",
            "every 0s",
            "every soon",
            "5m",
            "* * *",
            "99 * * * *",
        ] {
            let error = bad.parse::<Schedule>().unwrap_err().to_string();
            assert!(error.contains(bad.trim()), "{bad}: {error}");
        }
        assert!("every 500ms".parse::<Schedule>().is_err());
    }
}
