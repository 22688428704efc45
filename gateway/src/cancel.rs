//! Query cancellation across the pool.
//!
//! Each client gets the gateway's own BackendKeyData. The client's entry here says which server connection
//! runs its query right now (if any), so a CancelRequest, which arrives on a fresh connection, can be sent on
//! to that server with the server's own key. Unknown keys are ignored, as PostgreSQL does.

use crate::metrics::METRICS;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;

/// Where a client's current query runs.
#[derive(Clone, Copy, Debug)]
pub struct ServerTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// One client's slot: updated on every checkout and release.
#[derive(Default)]
pub struct CancelSlot {
    target: Mutex<Option<ServerTarget>>,
}

impl CancelSlot {
    pub fn set(&self, target: Option<ServerTarget>) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
}

/// Removes the client's key when its session ends.
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.pid, self.secret));
    }
}

impl CancelRegistry {
    /// A fresh random key for a new client.
    pub fn register(self: &Arc<Self>) -> CancelKey {
        let slot = Arc::new(CancelSlot::default());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let pid = rand::random::<i32>() & i32::MAX;
            let secret = rand::random::<i32>();
            if let std::collections::hash_map::Entry::Vacant(entry) = clients.entry((pid, secret)) {
                entry.insert(slot.clone());
                return CancelKey {
                    registry: self.clone(),
                    pid,
                    secret,
                    slot,
                };
            }
        }
    }

    /// Forwards a CancelRequest to the server running the client's query, if any.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(pid, secret))
            .and_then(|slot| *slot.target.lock().unwrap_or_else(|p| p.into_inner()));
        let Some(target) = target else {
            METRICS.cancels.with_label_values(&["no_query"]).inc();
            tracing::debug!(pid, "cancel request for no running query");
            return;
        };
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
}
