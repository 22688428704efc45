//! Shutting down without cutting anyone off: the drain.
//!
//! A drain has two phases. While **draining**, the gateway accepts no one; every request in flight and every
//! open transaction runs to its end, and each client is closed at its next boundary (idle, outside a
//! transaction) with `FATAL 57P01`, as PostgreSQL closes a terminated backend's client. When the timeout
//! passes, **cutting** closes everyone left: requests still running are cancelled on their servers, and the
//! clients get the same `57P01`; their transactions roll back.
//!
//! Sessions learn of a phase change without a lock or a registration per wait: each registers its task's
//! waker in its client entry once (a task's waker stays the same for its life; a wake takes it out, and the
//! session puts it back when it has acted on the phase), and while it waits for its client it looks at the
//! phase whenever it is polled; the drain wakes every entry. A session waiting for a
//! server is not woken: it reaches a boundary, or is cancelled, and sees the phase then.

use crate::metrics::METRICS;
use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Where the gateway is in its life. Ordered: a phase only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Serving = 0,
    Draining = 1,
    Cutting = 2,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Cutting,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Cutting => "cutting",
        }
    }
}

/// How a client's session ended during a drain.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    /// Idle outside a transaction when the drain reached it: closed with 57P01.
    Closed,
    /// Busy (a request or transaction) when the drain began, closed at the end of it.
    Finished,
    /// Still in a transaction or request at the timeout: cancelled, rolled back, closed with 57P01.
    Cut,
    /// The client left on its own.
    Left,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Closed,
        Outcome::Finished,
        Outcome::Cut,
        Outcome::Left,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Finished => "finished",
            Outcome::Cut => "cut",
            Outcome::Left => "left",
        }
    }
}

/// The gateway's drain: its phase, when it began and must end, and what it did.
pub struct Drain {
    phase: AtomicU8,
    changes: watch::Sender<Phase>,
    /// When the drain began, and the instant at which cutting begins.
    times: Mutex<Option<(Instant, Instant)>>,
    /// Why it began (the signal, or the console).
    why: Mutex<&'static str>,
    outcomes: [AtomicU64; 4],
    /// Client connections not yet ended (in their login, or sessions), which the drain waits for. The admin
    /// console's are not counted: it stays open while the gateway drains, to watch it.
    live: AtomicUsize,
    /// Console KILLs so far (see [`Kicked::seen_kills`]).
    kills: std::sync::atomic::AtomicU32,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            phase: AtomicU8::new(Phase::Serving as u8),
            changes: watch::channel(Phase::Serving).0,
            times: Mutex::new(None),
            why: Mutex::new(""),
            outcomes: Default::default(),
            live: AtomicUsize::new(0),
            kills: Default::default(),
        }
    }
}

impl Drain {
    #[inline]
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Asks for a drain that cuts after `timeout` (zero: cut now). A drain already under way keeps the
    /// earlier of the two deadlines: a second signal shortens it, never lengthens it.
    pub fn request(&self, timeout: Duration, why: &'static str) {
        let now = Instant::now();
        let mut times = self.times.lock().unwrap_or_else(|p| p.into_inner());
        let cut_at = now + timeout;
        match times.as_mut() {
            Some((_, deadline)) => {
                if cut_at < *deadline {
                    *deadline = cut_at;
                    tracing::warn!(
                        why,
                        cut_in_ms = timeout.as_millis() as u64,
                        "shutdown hastened"
                    );
                }
            }
            None => {
                *times = Some((now, cut_at));
                *self.why.lock().unwrap_or_else(|p| p.into_inner()) = why;
                tracing::info!(
                    why,
                    timeout_ms = timeout.as_millis() as u64,
                    "draining: accepting no new clients; transactions in flight may finish"
                );
            }
        }
        drop(times);
        self.advance(Phase::Draining);
        // The drain's own loop (in `Gateway::run`) moves to cutting when the deadline passes; it is woken by
        // the change above.
        self.changes.send_modify(|_| {});
    }

    /// Moves the phase forward (never back), telling whoever watches.
    pub fn advance(&self, phase: Phase) {
        let old = self.phase.fetch_max(phase as u8, Ordering::AcqRel);
        if old < phase as u8 {
            METRICS.draining.set(phase as i64);
            self.changes.send_replace(phase);
        }
    }

    /// When the drain began and when it cuts; None while serving.
    pub fn times(&self) -> Option<(Instant, Instant)> {
        *self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn why(&self) -> &'static str {
        *self.why.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Phase changes and hastened deadlines, for the tasks that are not sessions (the accept loop, the admin
    /// console).
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.changes.subscribe()
    }

    /// Counts how a session ended during the drain.
    pub fn ended(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        METRICS
            .drain_clients
            .with_label_values(&[outcome.label()])
            .inc();
    }

    /// Sessions ended during the drain, by outcome.
    pub fn counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Outcome::ALL.iter().map(|o| {
            (
                o.label(),
                self.outcomes[*o as usize].load(Ordering::Relaxed),
            )
        })
    }

    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome as usize].load(Ordering::Relaxed)
    }

    /// Counts a client connection as live until the guard is dropped or released.
    pub fn live(&self) -> Live<'_> {
        self.live.fetch_add(1, Ordering::AcqRel);
        Live { drain: Some(self) }
    }

    /// The count of a connection whose guard was handed over ([`Live::hand_over`]).
    pub fn taken_over(&self) -> Live<'_> {
        Live { drain: Some(self) }
    }

    /// Client connections the drain still waits for.
    pub fn live_clients(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }
}

/// One live client connection (see [`Drain::live`]).
pub struct Live<'a> {
    drain: Option<&'a Drain>,
}

impl Live<'_> {
    /// The connection goes on in another task, which takes the count over with [`Drain::taken_over`].
    pub fn hand_over(mut self) {
        self.drain = None;
    }

    /// This connection no longer holds the drain back (it is the admin console's).
    pub fn release(&mut self) {
        if let Some(drain) = self.drain.take() {
            drain.live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Ready with the new phase when the drain moved past `seen` (the session's waker is registered apart, see
/// [`register`]).
#[derive(Clone, Copy)]
pub struct Kicked<'a> {
    pub drain: &'a Drain,
    pub seen: Phase,
    /// The console KILLs the session had seen: a new one kicks it, to look whether it is one of those killed
    /// (a count rather than the session's own flag keeps this future, which every idle session holds, small).
    pub seen_kills: u8,
}

/// Puts the running task's waker in `slot`, for the drain to wake.
pub async fn register(slot: &AtomicWaker) {
    std::future::poll_fn(|cx| {
        slot.register(cx.waker());
        Poll::Ready(())
    })
    .await
}

impl Drain {
    /// A console KILL is about to end sessions: every session looks at its own flag at its next wait.
    pub fn note_kill(&self) {
        self.kills.fetch_add(1, Ordering::Release);
    }

    /// The count's low byte: a session compares it with the one it saw (256 KILLs between two of its waits
    /// would go unseen until the next).
    pub fn kills(&self) -> u8 {
        self.kills.load(Ordering::Acquire) as u8
    }
}

impl Kicked<'_> {
    /// The phase, when the drain moved past what the session saw. (The session is woken by its registered
    /// waker; a poll only looks.)
    #[inline]
    pub fn moved(&self) -> Option<Phase> {
        let phase = self.drain.phase();
        (phase > self.seen || self.drain.kills() != self.seen_kills).then_some(phase)
    }
}

impl Future for Kicked<'_> {
    type Output = Phase;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Phase> {
        match self.moved() {
            Some(phase) => Poll::Ready(phase),
            None => Poll::Pending,
        }
    }
}
