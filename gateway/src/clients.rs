//! The connected clients: their cancel keys, and what the admin console shows of them.
//!
//! Each client gets the gateway's own BackendKeyData. Its entry says which server connection runs its query
//! right now (if any), so a CancelRequest, which arrives on a fresh connection, can be sent on to that server
//! with the server's own key; unknown keys are ignored, as PostgreSQL does. The same entry is what
//! `SHOW CLIENTS` and `SHOW SERVERS` read.

use crate::metrics::METRICS;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;

/// Where a client's current query runs.
#[derive(Clone, Copy, Debug)]
pub struct ServerTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// One connected client.
pub struct ClientEntry {
    pub addr: SocketAddr,
    /// Shared by the clients with the same name (see [`Clients::register`]).
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub application_name: Box<str>,
    pub connected_at: SystemTime,
    /// Server connections checked out so far (one per transaction in transaction mode).
    pub checkouts: AtomicU64,
    target: Mutex<Option<ServerTarget>>,
    pinned: Mutex<Option<&'static str>>,
    /// The session's task while it waits for its client: the drain wakes it (see [`crate::drain`]), and so
    /// does the console's KILL.
    pub kick: futures_util::task::AtomicWaker,
    /// The console's KILL: the session ends at its next wait.
    killed: AtomicBool,
    /// Held by PAUSE (or SUSPEND) before its next transaction.
    waiting: AtomicBool,
}

impl ClientEntry {
    /// The server connection the client holds now; updated on every checkout and release.
    pub fn set_server(&self, target: Option<ServerTarget>) {
        if target.is_some() {
            // The client's session is the only writer: no locked add needed.
            self.checkouts.store(
                self.checkouts.load(Ordering::Relaxed) + 1,
                Ordering::Relaxed,
            );
        }
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    pub fn server(&self) -> Option<ServerTarget> {
        *self.target.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_pinned(&self, reason: &'static str) {
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    pub fn pinned(&self) -> Option<&'static str> {
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the session at its next wait (the console's KILL).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.kick.wake();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    pub fn set_waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::Relaxed);
    }

    pub fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Who a client is, for its entry.
pub struct ClientInfo {
    pub addr: SocketAddr,
    pub user: String,
    pub database: String,
    pub application_name: String,
}

#[derive(Default)]
pub struct Clients {
    by_key: Mutex<HashMap<(i32, i32), Arc<ClientEntry>>>,
    /// User and database names, one copy each for all their clients: two allocations fewer per client.
    names: Mutex<Names>,
}

/// Interned names. A name no client holds any more is dropped at the next sweep, made when the set has
/// doubled since the last one: the set stays within twice the names in use (plus a few), whatever names come
/// and go (a role per tenant, a database per test run), at an amortized constant cost per login.
#[derive(Default)]
struct Names {
    set: std::collections::HashSet<Arc<str>>,
    sweep_at: usize,
}

impl Names {
    /// The shared copy of `name`.
    fn intern(&mut self, name: String) -> Arc<str> {
        if let Some(name) = self.set.get(name.as_str()) {
            return name.clone();
        }
        if self.set.len() >= self.sweep_at {
            // Held only by the set: no client has it.
            self.set.retain(|name| Arc::strong_count(name) > 1);
            self.sweep_at = (2 * self.set.len()).max(64);
        }
        let name: Arc<str> = name.into();
        self.set.insert(name.clone());
        name
    }
}

/// A client's registration: its cancel key and entry, removed when the session ends.
pub struct ClientHandle {
    clients: Arc<Clients>,
    pub pid: i32,
    pub secret: i32,
    pub entry: Arc<ClientEntry>,
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.clients
            .by_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.pid, self.secret));
    }
}

impl Clients {
    /// Registers a new client under a fresh random cancel key: a random pid, or the pid of the backend it
    /// holds for its whole session (session pool mode), and always a random secret. None when `max` clients
    /// are registered already.
    pub fn register(
        self: &Arc<Self>,
        backend_pid: Option<i32>,
        info: ClientInfo,
        max: usize,
    ) -> Option<ClientHandle> {
        let (user, database) = {
            let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
            (names.intern(info.user), names.intern(info.database))
        };
        let entry = Arc::new(ClientEntry {
            addr: info.addr,
            user,
            database,
            application_name: info.application_name.into_boxed_str(),
            connected_at: SystemTime::now(),
            checkouts: AtomicU64::new(0),
            target: Mutex::new(None),
            pinned: Mutex::new(None),
            kick: Default::default(),
            killed: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
        });
        let mut clients = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if clients.len() >= max {
            return None;
        }
        loop {
            let pid = backend_pid.unwrap_or_else(|| rand::random::<i32>() & i32::MAX);
            let secret = rand::random::<i32>();
            if let std::collections::hash_map::Entry::Vacant(slot) = clients.entry((pid, secret)) {
                slot.insert(entry.clone());
                return Some(ClientHandle {
                    clients: self.clone(),
                    pid,
                    secret,
                    entry,
                });
            }
        }
    }

    /// Clients logged in now (the admin console's sessions are not clients).
    pub fn count(&self) -> usize {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Every connected client, with its gateway pid.
    pub fn list(&self) -> Vec<(i32, Arc<ClientEntry>)> {
        let mut list: Vec<_> = self
            .by_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((pid, _), entry)| (*pid, entry.clone()))
            .collect();
        list.sort_by_key(|(_, e)| e.connected_at);
        list
    }

    /// KILL db: ends every session of the database at its next wait; how many.
    pub fn kill_database(&self, database: &str) -> usize {
        let clients = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let mut killed = 0;
        for entry in clients.values().filter(|e| *e.database == *database) {
            entry.kill();
            killed += 1;
        }
        killed
    }

    /// Wakes every session, to look at the drain's phase.
    pub fn kick_all(&self) {
        for entry in self
            .by_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            entry.kick.wake();
        }
    }

    /// Forwards a CancelRequest to the server running the client's query, if any.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = self
            .by_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(pid, secret))
            .and_then(|entry| entry.server());
        let Some(target) = target else {
            METRICS.cancels.with_label_values(&["no_query"]).inc();
            tracing::debug!(pid, "cancel request for no running query");
            return;
        };
        cancel_server(target).await;
    }
}

/// Sends a CancelRequest for the query running on a server connection (a client's cancel, or the gateway's
/// statement timeout).
pub async fn cancel_server(target: ServerTarget) {
    let mut packet = Vec::with_capacity(16);
    packet.extend_from_slice(&16i32.to_be_bytes());
    packet.extend_from_slice(&80877102i32.to_be_bytes());
    packet.extend_from_slice(&target.pid.to_be_bytes());
    packet.extend_from_slice(&target.secret.to_be_bytes());
    let sent = async {
        let mut stream = tokio::net::TcpStream::connect(target.addr).await?;
        stream.write_all(&packet).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), sent).await {
        Ok(Ok(())) => {
            METRICS.cancels.with_label_values(&["forwarded"]).inc();
            tracing::info!(server = %target.addr, server_pid = target.pid, "cancel request forwarded");
        }
        _ => {
            METRICS.cancels.with_label_values(&["failed"]).inc();
            tracing::warn!(server = %target.addr, "could not forward a cancel request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One copy per name in use; names no client holds go at a sweep, so that names that come and go do not
    /// pile up.
    #[test]
    fn interned_names_are_shared_and_swept_when_unused() {
        let mut names = Names::default();
        let a = names.intern("app".to_string());
        let b = names.intern("app".to_string());
        assert!(Arc::ptr_eq(&a, &b));
        for i in 0..1000 {
            // A tenant's name, held by no client once its login is over.
            drop(names.intern(format!("tenant_{i}")));
        }
        assert!(names.set.len() <= 130, "{} names kept", names.set.len());
        // The name in use survives the sweeps.
        let c = names.intern("app".to_string());
        assert!(Arc::ptr_eq(&a, &c));
    }
}
