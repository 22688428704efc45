//! Online restart (SIGUSR2, the console's RESTART): a new process of the same binary, with the same
//! arguments and so the same configuration file, starts on the same address while this one still listens
//! (the listener is shared, `SO_REUSEPORT`). When the new process says it is ready, this one drains
//! ([`crate::drain`]). A new process that does not get ready is stopped, and this one goes on serving.
//!
//! The new process says it is ready on a pipe it inherits as file descriptor 3, named in
//! `REGIONGATE_READY_FD`: it writes `ready` there once it accepts clients and `/readyz` would answer 200.

use crate::drain::Phase;
use crate::Shared;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The environment variable naming the descriptor a new process reports its readiness on.
pub const READY_FD: &str = "REGIONGATE_READY_FD";
/// The descriptor the new process gets the pipe as.
const CHILD_FD: i32 = 3;
/// How long a new process may take to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start this process again: the binary and its arguments (set by the binary's `main`; a gateway
/// embedded in another program, such as a test, cannot restart itself).
#[derive(Debug, Clone)]
pub struct Relaunch {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl Relaunch {
    /// This process, as it was started.
    pub fn current() -> std::io::Result<Relaunch> {
        Ok(Relaunch {
            program: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("this gateway was not started by the regiongate binary; it cannot start itself again")]
    NotTheBinary,
    #[error("the gateway is already shutting down")]
    Draining,
    #[error("a restart is already under way")]
    Busy,
    #[error("cannot start the new process: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("the new process (pid {pid}) did not get ready within {}s; it was stopped, and this one goes on serving", READY_TIMEOUT.as_secs())]
    NotReady { pid: u32 },
}

static RESTARTING: AtomicBool = AtomicBool::new(false);

/// Starts the new process, waits until it is ready, then drains this one with `shutdown_timeout`. The new
/// process's pid.
pub async fn restart(shared: &Arc<Shared>, why: &'static str) -> Result<u32, RestartError> {
    let relaunch = shared
        .relaunch
        .get()
        .ok_or(RestartError::NotTheBinary)?
        .clone();
    if shared.drain.phase() != Phase::Serving {
        return Err(RestartError::Draining);
    }
    if RESTARTING.swap(true, Ordering::AcqRel) {
        return Err(RestartError::Busy);
    }
    let result = start_and_wait(&relaunch, why).await;
    RESTARTING.store(false, Ordering::Release);
    let pid = result?;
    let timeout = shared.config.load().shutdown_timeout;
    shared.drain.request(timeout, why);
    Ok(pid)
}

async fn start_and_wait(relaunch: &Relaunch, why: &'static str) -> Result<u32, RestartError> {
    let (mut reader, writer) = std::io::pipe()?;
    let fd = writer.as_raw_fd();
    let mut command = std::process::Command::new(&relaunch.program);
    command
        .args(&relaunch.args)
        .env(READY_FD, CHILD_FD.to_string());
    // SAFETY: between fork and exec only async-signal-safe calls: dup2, or fcntl when the pipe already is
    // descriptor 3 (dup2 onto itself would leave it close-on-exec).
    unsafe {
        command.pre_exec(move || {
            let done = if fd == CHILD_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, CHILD_FD)
            };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    // Only the child holds the write end now: its exit shows as the end of the pipe.
    drop(writer);
    let pid = child.id();
    tracing::info!(pid, why, program = %relaunch.program.display(), "restart: started a new process; waiting until it is ready");
    let said = tokio::task::spawn_blocking(move || {
        let mut said = String::new();
        let _ = reader.read_to_string(&mut said);
        said
    });
    match tokio::time::timeout(READY_TIMEOUT, said).await {
        Ok(Ok(said)) if said.starts_with("ready") => {
            tracing::info!(pid, "restart: the new process is ready; this one drains");
            // Reaped when it exits, should that be before this process does.
            std::thread::spawn(move || child.wait());
            Ok(pid)
        }
        _ => {
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            let error = RestartError::NotReady { pid };
            tracing::error!(%error, "restart failed");
            Err(error)
        }
    }
}

/// In a process started by [`restart`]: tells the old one that this one is ready, once it is.
pub fn report_ready_when_ready(shared: Arc<Shared>) {
    let Some(fd) = std::env::var(READY_FD)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: the descriptor was opened for this process by its parent (see `start_and_wait`), and nothing
    // else here uses it.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    tokio::spawn(async move {
        while crate::http::readiness(&shared).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Err(error) = pipe.write_all(b"ready\n") {
            tracing::warn!(%error, "could not tell the old process that this one is ready");
        }
    });
}
