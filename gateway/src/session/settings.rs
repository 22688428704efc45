//! The session's side of settings ([`crate::settings`] says how settings move): which statements may change
//! them, the capture that reads them back from the server before a connection goes, the RESET that must come
//! back to the client's connection-time values, and giving a server connection the session's settings.

use crate::metrics::METRICS;
use crate::pool::Lease;
use crate::protocol::PgError;
use crate::server::ServerConn;
use crate::settings::{SessionSettings, Settings};
use crate::sql::Kind;
use std::collections::BTreeSet;
use std::sync::Arc;

/// What a statement may do to the session's settings: the server is asked afterwards (a capture), and a
/// RESET is followed by the client's own reset values.
#[derive(Clone, Debug, Default)]
pub struct Touch {
    /// Custom settings it names (`app.tenant`): invisible in `pg_settings`, so a capture asks for them.
    pub custom: Vec<String>,
    /// Parameters (zero-based) whose values name settings, as in `set_config($1, $2, false)`.
    pub parameters: Vec<usize>,
    /// It resets settings to their defaults.
    pub reset: Reset,
}

impl Touch {
    /// What a statement of this kind may do to the session's settings, if anything.
    pub fn of(kind: &Kind) -> Option<Touch> {
        let custom = |name: &String| name.contains('.').then(|| name.clone());
        Some(match kind {
            Kind::Set { name } => Touch {
                custom: custom(name).into_iter().collect(),
                ..Touch::default()
            },
            Kind::Reset { name: Some(name) } => Touch {
                custom: custom(name).into_iter().collect(),
                reset: Reset::Names(vec![name.clone()]),
                ..Touch::default()
            },
            Kind::Reset { name: None } | Kind::DiscardAll => Touch {
                reset: Reset::All,
                ..Touch::default()
            },
            Kind::SetConfig { names, parameters } => Touch {
                custom: names.iter().filter_map(custom).collect(),
                parameters: parameters.clone(),
                reset: Reset::Nothing,
            },
            _ => return None,
        })
    }

    /// A set_config call in a statement whose kind says nothing of settings (PREPARE, EXPLAIN, CREATE ... AS,
    /// DECLARE).
    pub fn hidden(text: &[u8], range: std::ops::Range<usize>) -> Option<Touch> {
        let (names, parameters) = crate::sql::set_config_in(text, range)?;
        Touch::of(&Kind::SetConfig { names, parameters })
    }
}

/// Settings a request resets, whose connection-time values the client must get back.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Reset {
    #[default]
    Nothing,
    Names(Vec<String>),
    All,
}

impl Reset {
    pub fn add(&mut self, other: Reset) {
        match (&mut *self, other) {
            (_, Reset::Nothing) | (Reset::All, _) => {}
            (Reset::Names(names), Reset::Names(more)) => names.extend(more),
            (this, other) => *this = other,
        }
    }
}

#[derive(Default)]
struct Named {
    /// Custom settings the client named (a capture asks for them).
    custom: BTreeSet<String>,
    /// The rows of a capture under way.
    rows: Vec<Vec<Option<String>>>,
}

/// The settings of one client's session, and what the gateway does to keep them exact.
pub struct Tracker {
    /// What the session holds now (as last read back from the server).
    pub current: Settings,
    /// The session's settings right after login: what RESET returns to.
    reset_values: Settings,
    /// The custom settings the client named, and the rows of a capture under way: made when first needed
    /// (empty, they would take 48 bytes of every idle client).
    named: Option<Box<Named>>,
    /// A request that may have changed settings was sent: read them back before the connection goes.
    touched: bool,
    /// A capture was sent: the client's next message waits for the connection's release.
    capturing: bool,
    /// The last capture failed once and was sent again.
    retried: bool,
    /// A capture failed twice: what the session's settings are is unknown, so it cannot go on.
    lost: bool,
}

impl Tracker {
    /// A session starting with its login settings.
    pub fn new(login: &Settings) -> Tracker {
        Tracker {
            current: login.clone(),
            reset_values: login.clone(),
            named: {
                let custom: BTreeSet<String> = login.custom_names().cloned().collect();
                (!custom.is_empty()).then(|| {
                    Box::new(Named {
                        custom,
                        rows: Vec::new(),
                    })
                })
            },
            touched: false,
            capturing: false,
            retried: false,
            lost: false,
        }
    }

    /// A statement that may change settings is on its way: note what a capture must ask for.
    pub fn touched(&mut self, touch: &Touch) {
        self.touched = true;
        for name in &touch.custom {
            let custom = &mut self.named.get_or_insert_default().custom;
            if !custom.contains(name) {
                custom.insert(name.clone());
            }
        }
    }

    /// A request that may change anything (a function call, a reported parameter change) was seen.
    pub fn touch(&mut self) {
        self.touched = true;
    }

    /// A bound parameter names a custom setting.
    pub fn named(&mut self, name: String) {
        self.named.get_or_insert_default().custom.insert(name);
    }

    pub fn is_touched(&self) -> bool {
        self.touched
    }

    /// Settings changed since the last capture are unknown from now on (the connection went with them).
    pub fn take_touched(&mut self) -> bool {
        std::mem::take(&mut self.touched)
    }

    /// While the session's settings are read back, its next request waits.
    #[inline]
    pub fn capturing(&self) -> bool {
        self.capturing
    }

    /// The capture was answered, or its connection is gone.
    #[inline]
    pub fn capture_over(&mut self) {
        self.capturing = false;
    }

    #[inline]
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// The query that reads the session's settings back, when a request may have changed them. It starts a
    /// capture.
    #[inline]
    pub fn capture_sql(&mut self) -> Option<String> {
        if !std::mem::take(&mut self.touched) {
            return None;
        }
        Some(self.start_capture())
    }

    fn start_capture(&mut self) -> String {
        METRICS.settings_captures.inc();
        self.capturing = true;
        match &mut self.named {
            Some(named) => {
                named.rows.clear();
                crate::settings::capture_sql(named.custom.iter())
            }
            None => crate::settings::capture_sql(std::iter::empty()),
        }
    }

    pub fn capture_row(&mut self, row: Vec<Option<String>>) {
        self.named.get_or_insert_default().rows.push(row);
    }

    /// The capture's answer is complete: the connection holds what the server said, the client that over
    /// its reset values.
    pub fn captured(&mut self, conn: &mut ServerConn) {
        self.retried = false;
        let rows = match &mut self.named {
            Some(named) => std::mem::take(&mut named.rows),
            None => Vec::new(),
        };
        let held = crate::settings::from_capture(&rows, conn.login_user());
        let session = SessionSettings::over(held.clone(), &self.reset_values);
        let held = Arc::new(held);
        conn.captured_settings(held.clone());
        self.current = if session == *held {
            held
        } else {
            Arc::new(session)
        };
    }

    /// The capture failed. A cancel that arrived late (the client's, or the statement timeout's) can hit it:
    /// the connection is idle and unchanged, so it is asked again, once; a second failure loses the settings.
    pub fn capture_failed(&mut self) {
        if !std::mem::replace(&mut self.retried, true) {
            self.touched = true;
        } else {
            self.lost = true;
        }
    }

    /// SQL giving back the client's reset values after its request reset `reset`, if any.
    pub fn restore_sql(&self, reset: &Reset) -> Option<String> {
        let names = match reset {
            Reset::Nothing => return None,
            Reset::Names(names) => Some(names.as_slice()),
            Reset::All => None,
        };
        self.reset_values.restore_sql(names)
    }

    /// The connection has this session's settings and identity already (nearly always): nothing to bring.
    #[inline]
    pub fn in_step(&mut self, lease: &mut Lease) -> bool {
        !lease.conn().settings_differ(&mut self.current)
    }

    /// Gives a server connection this session's settings and identity, and waits for the server to confirm,
    /// so that the client's statement never runs where they failed to apply (it would run with another
    /// client's identity). On failure the connection is marked for closing.
    pub async fn bring(&mut self, lease: &mut Lease) -> Result<(), PgError> {
        let conn = lease.conn();
        if !conn.settings_differ(&mut self.current) {
            return Ok(());
        }
        METRICS.settings_replays.inc();
        // Boxed: rare, and large (see `Pool::checkout`).
        let Err(failure) = Box::pin(conn.replay_settings(&self.current)).await else {
            return Ok(());
        };
        METRICS.settings_replay_failures.inc();
        tracing::warn!(server = %conn.addr(), pid = conn.pid(), reason = %failure, "could not give a server connection this session's settings; closing it");
        let (code, message) = failure.code_and_message();
        Err(PgError {
            severity: "ERROR",
            code,
            message: format!(
                "regiongate: this session's settings could not be restored on a server connection \
                 ({message}); the statement was not run"
            ),
            ..PgError::error("XX000", "")
        })
    }
}
