//! A session's settings as PostgreSQL holds them, and how to move them from one server connection to another.
//!
//! Transaction pooling runs one client's session on many server connections, so the gateway must know each
//! connection's settings and the client's, and turn one into the other before the client's next statement runs
//! there. Two things make that exact:
//! - **Values, not statements.** The gateway does not replay the text of a client's SETs (`SET datestyle TO
//!   ymd` means something different after another client's `SET datestyle = 'SQL, DMY'`). After a client's
//!   request that may have changed a setting, the server is asked what its settings now are ([`capture_sql`]):
//!   every setting whose source is the session, the custom (`app.tenant`) settings the client named, the
//!   session authorization and the role. That answer is the state, and values are replayed as the server
//!   printed them.
//! - **PostgreSQL's order.** `SET SESSION AUTHORIZATION` resets the role, and superuser-only settings can be
//!   reset only by a superuser. [`change_sql`] resets the identity first, then moves the settings as the login
//!   user, then sets the session authorization and last the role: the result equals what one backend holds.
//!
//! A client's connection-time values (startup parameters and `-c` options) are its reset values: a `RESET`
//! returns to them on a direct connection, while a pooled connection resets to the server's defaults. The
//! session restores them after such a RESET ([`SessionSettings::restore_sql`]).

use crate::protocol::quote_literal;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Settings of one session that differ from a fresh server connection's, by lower-case name, with the value
/// `current_setting` shows; plus who the session is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SessionSettings {
    pub values: BTreeMap<String, String>,
    /// `SET SESSION AUTHORIZATION`, when not the user the connection logged in as.
    pub authorization: Option<String>,
    /// `SET ROLE`, when not NONE.
    pub role: Option<String>,
}

/// Shared by pointer, so that the common case (the server connection already holds the client's settings) is
/// a pointer comparison.
pub type Settings = Arc<SessionSettings>;

/// Names the transaction owns (source `session` only inside the transaction that set them).
const TRANSACTION_SCOPED: [&str; 3] = [
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
];

impl SessionSettings {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Custom settings (a dot in the name) are invisible in `pg_settings`: a capture must name them.
    pub fn custom_names(&self) -> impl Iterator<Item = &String> {
        self.values.keys().filter(|n| n.contains('.'))
    }

    /// The session after a capture: what the server holds (`captured`) over the client's reset values, because
    /// a setting the session does not hold has its reset value, and the client's come from its startup.
    pub fn over(mut captured: SessionSettings, reset: &SessionSettings) -> SessionSettings {
        for (name, value) in &reset.values {
            captured
                .values
                .entry(name.clone())
                .or_insert_with(|| value.clone());
        }
        captured
    }

    /// SQL that gives back the reset values of `names` (all of them for None) after a request that reset
    /// them, on a pooled connection (which reset them to the server's defaults instead). None when there is
    /// nothing to restore. It restores only what is reset now: a RESET that was rolled back (in a failed
    /// request, or before a ROLLBACK in the same one) left the value set in the session, and it stays.
    pub fn restore_sql(&self, names: Option<&[String]>) -> Option<String> {
        let mut rows = String::new();
        for (name, value) in &self.values {
            if names.is_none_or(|names| names.iter().any(|n| n == name)) {
                if !rows.is_empty() {
                    rows.push_str(", ");
                }
                rows.push('(');
                rows.push_str(&quote_literal(name));
                rows.push_str(", ");
                rows.push_str(&quote_literal(value));
                rows.push(')');
            }
        }
        if rows.is_empty() {
            return None;
        }
        Some(format!(
            "SELECT pg_catalog.set_config(r.n, r.v, false) FROM (VALUES {rows}) AS r(n, v) \
             WHERE CASE WHEN pg_catalog.strpos(r.n, '.') OPERATOR(pg_catalog.>) 0 \
             THEN COALESCE(pg_catalog.current_setting(r.n, true), '') OPERATOR(pg_catalog.=) '' \
             ELSE NOT EXISTS (SELECT FROM pg_catalog.pg_settings s \
             WHERE pg_catalog.lower(s.name) OPERATOR(pg_catalog.=) r.n \
             AND s.source OPERATOR(pg_catalog.=) 'session') END"
        ))
    }
}

/// SQL that turns a server connection holding `from` into one holding `to`, in the order PostgreSQL applies
/// identity and settings (see the module's doc). Empty when they are equal.
pub fn change_sql(from: &SessionSettings, to: &SessionSettings) -> String {
    let mut sql = String::new();
    if from == to {
        return sql;
    }
    // As the login user, so that resetting a superuser-only setting is allowed; this also resets the role.
    let identity_from_login = from.authorization.is_some() || from.role.is_some();
    if identity_from_login {
        sql.push_str("RESET SESSION AUTHORIZATION; RESET ROLE; ");
    }
    for name in from.values.keys().filter(|n| !to.values.contains_key(*n)) {
        // A NULL value resets, and takes the name as a string (no identifier rules, no length cut).
        sql.push_str("SELECT pg_catalog.set_config(");
        sql.push_str(&quote_literal(name));
        sql.push_str(", NULL, false); ");
    }
    for (name, value) in &to.values {
        if from.values.get(name) != Some(value) {
            push_set(&mut sql, name, value);
        }
    }
    if identity_from_login || to.authorization.is_some() || to.role.is_some() {
        if let Some(user) = &to.authorization {
            sql.push_str("SET SESSION AUTHORIZATION ");
            sql.push_str(&quote_literal(user));
            sql.push_str("; ");
        }
        if let Some(role) = &to.role {
            sql.push_str("SET ROLE ");
            sql.push_str(&quote_literal(role));
            sql.push_str("; ");
        }
    }
    sql
}

fn push_set(sql: &mut String, name: &str, value: &str) {
    sql.push_str("SELECT pg_catalog.set_config(");
    sql.push_str(&quote_literal(name));
    sql.push_str(", ");
    sql.push_str(&quote_literal(value));
    sql.push_str(", false); ");
}

/// The query that reads a server connection's session state: rows of (name, value), with the identity under
/// `*`-prefixed names no setting has. `custom` are the custom settings to read besides `pg_settings`.
pub fn capture_sql<'a>(custom: impl Iterator<Item = &'a String>) -> String {
    // Operators are named with their schema: the client's search_path may hold operators of its own. The
    // isolation is the one a standby allows, whatever the session's default (it may be serializable, which a
    // replica refuses to read in).
    let mut sql = String::from(
        "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; \
         SELECT pg_catalog.lower(name), pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
         WHERE source OPERATOR(pg_catalog.=) 'session' \
         AND NOT name OPERATOR(pg_catalog.=) ANY (ARRAY[",
    );
    for (i, name) in TRANSACTION_SCOPED.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&quote_literal(name));
    }
    sql.push_str(
        "]::pg_catalog.text[]) \
         UNION ALL SELECT '*authorization', pg_catalog.current_setting('session_authorization') \
         UNION ALL SELECT '*role', pg_catalog.current_setting('role')",
    );
    let custom: BTreeSet<&String> = custom.collect();
    if !custom.is_empty() {
        sql.push_str(" UNION ALL SELECT n, pg_catalog.current_setting(n, true) FROM pg_catalog.unnest(ARRAY[");
        for (i, name) in custom.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&quote_literal(name));
        }
        sql.push_str("]::pg_catalog.text[]) AS n");
    }
    sql
}

/// SQL that clears a connection's session settings and identity, applies a client's startup parameters as
/// its session settings, and captures the result.
pub fn startup_sql(parameters: &[(String, String)]) -> String {
    // From the connection's own defaults, whatever its label says: what is captured here is remembered for
    // every client with these parameters.
    let mut sql = String::from("RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL; ");
    for (name, value) in parameters {
        push_set(&mut sql, name, value);
    }
    let custom: Vec<String> = parameters
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
        .filter(|name| name.contains('.'))
        .collect();
    sql.push_str(&capture_sql(custom.iter()));
    sql
}

/// The state a capture's rows describe (rows of other widths, from statements before it, are skipped);
/// `login_user` is the session authorization the connection logged in with (the same user is no change).
pub fn from_capture(rows: &[Vec<Option<String>>], login_user: &str) -> SessionSettings {
    let mut state = SessionSettings::default();
    for row in rows {
        let [Some(name), value] = row.as_slice() else {
            continue;
        };
        let Some(value) = value else {
            continue; // a custom setting no one defined
        };
        match name.as_str() {
            "*authorization" => {
                state.authorization = (value != login_user).then(|| value.clone());
            }
            "*role" => state.role = (value != "none").then(|| value.clone()),
            // An empty custom setting is one that was reset (or defined by another session's SET on this
            // connection): the same as unset.
            _ if name.contains('.') && value.is_empty() => {}
            _ => {
                state.values.insert(name.clone(), value.clone());
            }
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(values: &[(&str, &str)], auth: Option<&str>, role: Option<&str>) -> SessionSettings {
        SessionSettings {
            values: values
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            authorization: auth.map(str::to_string),
            role: role.map(str::to_string),
        }
    }

    #[test]
    fn identity_is_reset_first_and_set_last_role_after_authorization() {
        let from = state(
            &[("search_path", "s_other"), ("xmloption", "document")],
            Some("bob"),
            None,
        );
        let to = state(&[("work_mem", "7MB")], Some("postgres"), Some("dave"));
        assert_eq!(
            change_sql(&from, &to),
            "RESET SESSION AUTHORIZATION; RESET ROLE; \
             SELECT pg_catalog.set_config('search_path', NULL, false); \
             SELECT pg_catalog.set_config('xmloption', NULL, false); \
             SELECT pg_catalog.set_config('work_mem', '7MB', false); \
             SET SESSION AUTHORIZATION 'postgres'; SET ROLE 'dave'; "
        );
    }

    #[test]
    fn equal_states_need_nothing_and_a_plain_change_touches_no_identity() {
        let a = state(&[("datestyle", "SQL, DMY")], None, None);
        assert_eq!(change_sql(&a, &a), "");
        let b = state(
            &[("datestyle", "ISO, YMD"), ("app.tenant", "7")],
            None,
            None,
        );
        assert_eq!(
            change_sql(&a, &b),
            "SELECT pg_catalog.set_config('app.tenant', '7', false); \
             SELECT pg_catalog.set_config('datestyle', 'ISO, YMD', false); "
        );
        assert_eq!(
            change_sql(&b, &a),
            "SELECT pg_catalog.set_config('app.tenant', NULL, false); \
             SELECT pg_catalog.set_config('datestyle', 'SQL, DMY', false); "
        );
    }

    #[test]
    fn a_capture_reads_identity_and_skips_unset_custom_settings() {
        let row = |n: &str, v: Option<&str>| vec![Some(n.to_string()), v.map(str::to_string)];
        let rows = vec![
            vec![Some("set_config output".to_string())],
            row("search_path", Some("s1")),
            row("*authorization", Some("app")),
            row("*role", Some("none")),
            row("app.tenant", Some("")),
            row("app.other", None),
        ];
        assert_eq!(
            from_capture(&rows, "app"),
            state(&[("search_path", "s1")], None, None)
        );
        let rows = vec![
            row("*authorization", Some("bob")),
            row("*role", Some("r1")),
            row("app.tenant", Some("42")),
        ];
        assert_eq!(
            from_capture(&rows, "app"),
            state(&[("app.tenant", "42")], Some("bob"), Some("r1"))
        );
    }

    #[test]
    fn reset_values_fill_what_the_session_does_not_hold() {
        let reset = state(
            &[("work_mem", "7MB"), ("search_path", "pg_catalog")],
            None,
            None,
        );
        let captured = state(&[("search_path", "s1")], None, None);
        assert_eq!(
            SessionSettings::over(captured, &reset),
            state(&[("work_mem", "7MB"), ("search_path", "s1")], None, None)
        );
        let restore = reset.restore_sql(Some(&["work_mem".to_string()])).unwrap();
        assert!(
            restore.contains("(VALUES ('work_mem', '7MB'))"),
            "{restore}"
        );
        assert_eq!(reset.restore_sql(Some(&["timezone".to_string()])), None);
    }

    #[test]
    fn capture_names_custom_settings() {
        let sql = capture_sql([String::from("app.tenant")].iter());
        assert!(
            sql.contains("unnest(ARRAY['app.tenant']::pg_catalog.text[])"),
            "{sql}"
        );
        assert!(!capture_sql(std::iter::empty()).contains("unnest"));
    }
}
