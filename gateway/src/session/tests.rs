//! Tests of the session as a whole that need no PostgreSQL.

use super::*;

/// What an idle client costs is mostly its session's task: the session, and the largest thing the session
/// awaits. The rare, large awaits (a login, opening a server connection, a settings replay, a batch, the
/// goodbye) are boxed, and the login runs in a task of its own. Measured in a test build; a release build's
/// are a little smaller.
#[test]
fn an_idle_session_stays_small() {
    fn size_of_future<F: FnOnce(Session) -> T, T>(_: &F) -> usize {
        std::mem::size_of::<T>()
    }
    let session = std::mem::size_of::<Session>();
    assert!(session <= 1024, "Session is {session} bytes");
    let task = size_of_future(&|session: Session| session.live().instrument(tracing::Span::none()));
    eprintln!("Session: {session} bytes; the session's task's future: {task} bytes");
    assert!(task <= 2048, "a session's future is {task} bytes");
}
