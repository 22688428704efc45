//! Tests of the session as a whole that need no PostgreSQL.

use super::*;

/// What an idle client costs is mostly its session's task: the session, and the largest thing the session
/// awaits. The rare, large awaits (a login, opening a server connection, a settings replay, a batch, the
/// goodbye) are boxed, the login runs in a task of its own, and timers are boxed. Measured in a test build; a
/// release build's are a little smaller.
///
/// tokio's task cell is aligned to 128 bytes: a header (32), the future with the scheduler's handle and the
/// task's id (16), and a trailer (48), rounded up to a multiple of 128. A future of up to 1072 bytes makes a
/// cell of 1152; 8 bytes more would make it 1280, 128 bytes more per idle client.
#[test]
fn an_idle_session_stays_small() {
    fn size_of_future<F: FnOnce(Session) -> T, T>(_: &F) -> usize {
        std::mem::size_of::<T>()
    }
    let session = std::mem::size_of::<Session>();
    assert!(session <= 768, "Session is {session} bytes");
    // The session's task is spawned without its span when the span is off (debug level), as it is by default.
    let task = size_of_future(&|session: Session| session.live());
    eprintln!("Session: {session} bytes; the session's task's future: {task} bytes");
    assert!(task <= 1072, "a session's future is {task} bytes");
}
