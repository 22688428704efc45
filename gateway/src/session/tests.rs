//! Tests of the session as a whole that need no PostgreSQL.

use super::*;

/// What an idle client costs is mostly its session's future (the task tokio allocates for it), so that
/// future must stay small: the rare, large awaits (a login, opening a server connection, a settings
/// replay, a batch) are boxed. Measured in a test build; a release build's are a little smaller.
#[tokio::test]
async fn an_idle_session_stays_small() {
    fn size_of_future<F: std::future::Future>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }
    assert!(
        std::mem::size_of::<Session>() <= 1024,
        "Session is {} bytes",
        std::mem::size_of::<Session>()
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, peer) = listener.accept().await.unwrap();
    let config = crate::config::Config::parse(
        "primary: postgres://h/app\nauth: { method: trust }\n",
        "test",
    )
    .unwrap();
    let session = serve(crate::Shared::new(config, None, None), tcp, peer);
    let size = size_of_future(&session);
    assert!(size <= 2560, "a session's future is {size} bytes");
}
