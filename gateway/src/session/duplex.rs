//! A session's bytes: the client's stream, what it sent and what it is owed, what waits for the server, and
//! the one place that waits for sockets. Writes are buffered and go out when a socket is ready; reading from
//! one side stops while too much waits for the other (backpressure).
//!
//! An idle client holds no buffers: while it has nothing buffered and no server connection, its buffers go
//! to a per-thread stock of spare ones and it waits for its socket to become readable without one (over TLS,
//! rustls keeps what it holds of a record not yet whole, in buffers of its own). The next message takes them back
//! from the stock, so a busy session reuses warm buffers instead of allocating at every transaction, and tens
//! of thousands of idle clients cost no buffer memory.

use crate::drain::{Kicked, Phase};
use crate::server::ServerConn;
use crate::tls::Stream;
use bytes::{Buf, BytesMut};
use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Stop reading from one side while this much is waiting to be written to the other (backpressure).
pub const HIGH_WATER: usize = 256 * 1024;

pub struct Duplex {
    pub client: Stream,
    /// Client bytes not yet handled.
    pub from_client: BytesMut,
    pub to_client: BytesMut,
    pub to_server: BytesMut,
    /// Bytes left of a client message streamed through before it is complete (large CopyData), and
    /// whether they go to the server or are dropped.
    pub client_skip: usize,
    pub client_skip_forward: bool,
    /// Bytes left of a server message streamed through before it is complete (large DataRow).
    pub server_skip: usize,
    /// The three buffers are in the stock (or were never taken): the next wait takes a set. A flag of its
    /// own, because no buffer's capacity can tell: a buffer read to the end of its allocation has none left,
    /// yet the other two may hold bytes still owed.
    parked: bool,
}

/// What to wait for besides the client, decided by the session.
pub struct Watch<'a> {
    /// The server may speak (an answer is owed, or it is idle and may send a notification or close).
    pub server: bool,
    /// Only the client can move things on: it may be idle this long.
    pub idle: Option<Duration>,
    /// The request in flight ends at this instant (`limits.statement_timeout`).
    pub deadline: Option<Instant>,
    /// The drain's phase, while the session waits for its client.
    pub kick: Option<Kicked<'a>>,
}

pub enum IoEvent {
    /// The gateway's drain moved on (see [`crate::drain`]).
    Drain(Phase),
    /// The request in flight ran past `limits.statement_timeout`.
    StatementTimeout,
    /// The client sent nothing for `limits.client_idle_timeout` while nothing else was going on.
    ClientIdle,
    ClientRead(std::io::Result<usize>),
    ClientWrite(std::io::Result<usize>),
    ServerRead(std::io::Result<usize>),
    ServerWrite(std::io::Result<usize>),
}

/// A write that failed, and on which side.
pub enum Broken {
    Client,
    Server,
}

impl Duplex {
    pub fn new(client: Stream) -> Duplex {
        Duplex {
            client,
            from_client: BytesMut::new(),
            to_client: BytesMut::new(),
            to_server: BytesMut::new(),
            client_skip: 0,
            client_skip_forward: false,
            server_skip: 0,
            parked: true,
        }
    }

    /// What the client is told when its session is ready (AuthenticationOk and the rest), sent by the
    /// session's first flush.
    pub fn greet(&mut self, hello: BytesMut) {
        debug_assert!(self.parked && self.to_client.is_empty());
        self.parked = false;
        self.to_client = hello;
    }

    /// Whether a whole client message is in the buffer.
    #[inline]
    pub fn has_complete_message(&self) -> bool {
        matches!(crate::protocol::peek_header(&self.from_client), Some(Ok((_, len))) if self.from_client.len() >= len)
    }

    /// Nothing of the client's half-sent message is going to the server.
    #[inline]
    pub fn between_messages(&self) -> bool {
        self.server_skip == 0 && !(self.client_skip > 0 && self.client_skip_forward)
    }

    /// Writes what can be written without waiting.
    pub fn flush_now(&mut self, server: Option<&mut ServerConn>) -> Result<(), Broken> {
        if !self.to_server.is_empty() {
            if let Some(conn) = server {
                let (stream, _) = conn.io();
                while !self.to_server.is_empty() {
                    match stream.try_write(&self.to_server) {
                        Ok(n) => written(&mut self.to_server, n),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => return Err(Broken::Server),
                    }
                }
            }
        }
        while !self.to_client.is_empty() {
            match self.client.try_write(&self.to_client) {
                Ok(n) => written(&mut self.to_client, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(Broken::Client),
            }
        }
        Ok(())
    }

    /// Writes everything owed to the client, waiting for it (before the session waits for a server).
    pub async fn flush_client(&mut self) {
        if !self.to_client.is_empty() {
            let _ = self.client.write_all(&self.to_client).await;
            let _ = self.client.flush().await;
            self.to_client.clear();
        }
    }

    /// The session is over: writes `last` (its final words) within a second, then gives up.
    pub async fn goodbye(&mut self, last: &[u8]) {
        let client = &mut self.client;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            client.write_all(last).await?;
            client.flush().await
        })
        .await;
    }

    /// Waits until a socket is ready and moves bytes: reads from the client and the server, and writes
    /// what is waiting for either.
    ///
    /// (Not an `async fn`, which would keep a copy of its arguments beside the ones it works with, in the
    /// future every waiting session holds.)
    #[allow(clippy::manual_async_fn)] // on purpose, see above
    pub fn wait<'a>(
        &'a mut self,
        server: Option<&'a mut ServerConn>,
        watch: Watch<'a>,
    ) -> impl Future<Output = IoEvent> + 'a {
        async move {
            if server.is_none()
                && self.from_client.is_empty()
                && self.to_client.is_empty()
                && self.to_server.is_empty()
            {
                if let Some(event) = self.idle(watch.idle, watch.kick.as_ref()).await {
                    return event;
                }
            }
            if self.parked {
                // The client speaks again (or has not spoken yet): buffers for its exchange.
                self.take_buffers();
            }
            let read_client = self.to_server.len() < HIGH_WATER;
            let read_server = self.to_client.len() < HIGH_WATER;
            if self.from_client.capacity() - self.from_client.len() < 4096 {
                self.from_client.reserve(8192);
            }
            let (mut server, server_busy) = match server {
                Some(conn) => {
                    let (stream, read_buf) = conn.io();
                    if read_buf.capacity() - read_buf.len() < 4096 {
                        read_buf.reserve(16 * 1024);
                    }
                    let busy = read_server && watch.server
                        || !self.to_server.is_empty()
                        || stream.wants_flush();
                    (Some((stream, read_buf)), busy)
                }
                None => (None, false),
            };
            // One timer for both limits: the statement's deadline (a request is in flight only on a server),
            // or the end of the client's idle time, whichever comes first. Boxed (tokio's is 112 bytes, which
            // would take room in every waiting session's future) and made at the first poll that finds nothing
            // ready; the clock is read only when the client may be idle.
            let deadline = watch.deadline.filter(|_| server.is_some());
            let timer_at = first(watch.idle, deadline);
            let mut timer = None;
            // Each side polled in turn, by hand rather than with `select!` (its branch futures and bookkeeping
            // cost more than the polls at every wait): the server first (its answers are what the client
            // waits for), then the client, the drain and the timer.
            std::future::poll_fn(|cx| {
                if let Some((stream, read_buf)) = server.as_mut().filter(|_| server_busy) {
                    let to = &mut self.to_server;
                    if let Poll::Ready(event) =
                        poll_io(stream, read_buf, to, read_server, cx, Side::Server)
                    {
                        return Poll::Ready(event);
                    }
                }
                let (from, to) = (&mut self.from_client, &mut self.to_client);
                if let Poll::Ready(event) =
                    poll_io(&mut self.client, from, to, read_client, cx, Side::Client)
                {
                    return Poll::Ready(event);
                }
                if let Some(phase) = watch.kick.as_ref().and_then(Kicked::moved) {
                    return Poll::Ready(IoEvent::Drain(phase));
                }
                let Some(at) = timer_at else {
                    return Poll::Pending;
                };
                let timer =
                    timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
                timer.as_mut().poll(cx).map(|()| {
                    if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                        IoEvent::StatementTimeout
                    } else {
                        IoEvent::ClientIdle
                    }
                })
            })
            .await
        }
    }
}

/// The earlier of the end of the client's idle time (from now) and the statement's deadline. The clock is
/// read only when the client may be idle.
fn first(idle: Option<Duration>, deadline: Option<Instant>) -> Option<Instant> {
    match (idle.map(|idle| Instant::now() + idle), deadline) {
        (Some(idle), Some(deadline)) => Some(idle.min(deadline)),
        (idle, deadline) => idle.or(deadline),
    }
}

impl Duplex {
    /// The client is idle with nothing buffered: its buffers go to the stock while it waits for its socket to
    /// become readable (or `idle` to pass: [`IoEvent::ClientIdle`]), and come back with its next bytes. Over
    /// TLS too: rustls decrypts into the probe buffer, and what it holds of a record not yet whole stays in
    /// it. None when TLS records wait to go out (a key update's answer): the busy path flushes them.
    async fn idle(&mut self, idle: Option<Duration>, kick: Option<&Kicked<'_>>) -> Option<IoEvent> {
        if self.client.wants_flush() {
            return None;
        }
        self.give_buffers();
        // One timer for the whole idle time, boxed (as in [`Duplex::wait`]), made once the client has nothing
        // to read: most idle waits of a busy client find its next request there already.
        let mut timer = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(read) = self.poll_read_idle(cx) {
                return Poll::Ready(Some(IoEvent::ClientRead(read)));
            }
            if self.client.wants_flush() {
                return Poll::Ready(None);
            }
            if let Some(phase) = kick.and_then(Kicked::moved) {
                self.take_buffers();
                return Poll::Ready(Some(IoEvent::Drain(phase)));
            }
            let timer =
                timer.get_or_insert_with(|| idle.map(|idle| Box::pin(tokio::time::sleep(idle))));
            match timer.as_mut() {
                Some(timer) => timer.as_mut().poll(cx).map(|()| Some(IoEvent::ClientIdle)),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Reads what an idle client sent, if anything, into the thread's probe buffer, and only then takes
    /// buffers (Pending: nothing there, and the task is woken when something is).
    ///
    /// A plain socket is read with tokio's `poll_read`: a read that fills less than the probe tells tokio the
    /// socket is drained, so the wait for the answer that follows makes no system call to find the client
    /// silent (a `try_read` would leave the readiness set, and cost one `recv` more per transaction). Over
    /// TLS, rustls reads what it can without waiting, and the TCP socket's readiness says when to try again.
    fn poll_read_idle(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<usize>> {
        let client = &mut self.client;
        let buffers = [
            &mut self.from_client,
            &mut self.to_client,
            &mut self.to_server,
        ];
        let parked = &mut self.parked;
        spare::STOCK.with_borrow_mut(|stock| {
            let read = loop {
                match client {
                    Stream::Plain(tcp) => {
                        let mut buf = tokio::io::ReadBuf::new(&mut stock.probe[..]);
                        match std::pin::Pin::new(tcp).poll_read(cx, &mut buf) {
                            Poll::Ready(read) => break read.map(|()| buf.filled().len()),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    Stream::Tls(_) => match client.try_read(&mut stock.probe[..]) {
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                            match client.tcp().poll_read_ready(cx) {
                                Poll::Ready(Ok(())) => continue,
                                Poll::Ready(Err(error)) => break Err(error),
                                Poll::Pending => return Poll::Pending,
                            }
                        }
                        read => break read,
                    },
                }
            };
            let [from_client, to_client, to_server] = buffers;
            stock.take_into(from_client, to_client, to_server);
            *parked = false;
            if let Ok(n) = read {
                from_client.extend_from_slice(&stock.probe[..n]);
            }
            Poll::Ready(read)
        })
    }
}

impl Duplex {
    /// Gives the three buffers (empty) to the stock as one set.
    fn give_buffers(&mut self) {
        if self.parked {
            return;
        }
        self.parked = true;
        let set = [
            std::mem::take(&mut self.from_client),
            std::mem::take(&mut self.to_client),
            std::mem::take(&mut self.to_server),
        ];
        spare::give(set);
    }

    /// Takes a set of buffers from the stock, or new ones.
    fn take_buffers(&mut self) {
        if !self.parked {
            return;
        }
        self.parked = false;
        spare::STOCK.with_borrow_mut(|stock| {
            stock.take_into(
                &mut self.from_client,
                &mut self.to_client,
                &mut self.to_server,
            )
        });
    }
}

/// The per-thread stock of spare buffer sets (see the module's doc): one TLS access and one push or pop per
/// idle wait, cheaper than an allocation and a free per buffer.
mod spare {
    use bytes::BytesMut;
    use std::cell::RefCell;

    /// Sets kept per thread; past this they are freed.
    const SETS: usize = 256;
    /// A set holding a buffer grown larger than this (a big result) is freed rather than kept.
    const LARGEST: usize = 64 * 1024;

    pub struct Stock {
        sets: Vec<[BytesMut; 3]>,
        /// What an idle client's first read goes into, before it has buffers of its own (zeroed once per
        /// thread, not per read).
        pub probe: [u8; 4096],
    }

    thread_local! {
        pub static STOCK: RefCell<Stock> = const {
            RefCell::new(Stock {
                sets: Vec::new(),
                probe: [0; 4096],
            })
        };
    }

    pub fn give(set: [BytesMut; 3]) {
        debug_assert!(set.iter().all(BytesMut::is_empty));
        if set.iter().any(|b| b.capacity() > LARGEST) {
            return;
        }
        STOCK.with_borrow_mut(|stock| {
            if stock.sets.len() < SETS {
                stock.sets.push(set);
            }
        });
    }

    impl Stock {
        /// Gives a session whose buffers are parked (empty, [`super::Duplex::parked`]) a set from the stock,
        /// or new ones.
        pub fn take_into(
            &mut self,
            from_client: &mut BytesMut,
            to_client: &mut BytesMut,
            to_server: &mut BytesMut,
        ) {
            debug_assert!(from_client.is_empty() && to_client.is_empty() && to_server.is_empty());
            match self.sets.pop() {
                Some([from, to, server]) => {
                    *from_client = from;
                    *to_client = to;
                    *to_server = server;
                }
                None => {
                    from_client.reserve(8 * 1024);
                    to_client.reserve(16 * 1024);
                    to_server.reserve(8 * 1024);
                }
            }
        }
    }
}

/// Which side [`poll_io`] polls, for its event.
#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}

/// One side (client or server) of [`Duplex::wait`]: reads into `from` (when `read`), writes `to`, and over
/// TLS flushes records rustls still holds; ready with the first of these that happened, as that side's
/// event. One poll for both directions, because a TLS stream cannot be split into halves that wait
/// independently.
fn poll_io(
    stream: &mut Stream,
    from: &mut BytesMut,
    to: &mut BytesMut,
    read: bool,
    cx: &mut std::task::Context<'_>,
    side: Side,
) -> Poll<IoEvent> {
    if read {
        if let Poll::Ready(r) =
            tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *stream), cx, from)
        {
            return Poll::Ready(match side {
                Side::Client => IoEvent::ClientRead(r),
                Side::Server => IoEvent::ServerRead(r),
            });
        }
    }
    let wrote = if !to.is_empty() {
        std::pin::Pin::new(&mut *stream)
            .poll_write(cx, to)
            .map(|r| {
                if let Ok(n) = r {
                    written(to, n);
                }
                r
            })
    } else if stream.wants_flush() {
        std::pin::Pin::new(&mut *stream)
            .poll_flush(cx)
            .map(|r| r.map(|()| 0))
    } else {
        Poll::Pending
    };
    wrote.map(|r| match side {
        Side::Client => IoEvent::ClientWrite(r),
        Side::Server => IoEvent::ServerWrite(r),
    })
}

/// Drops the first `n` bytes of `buf`, which went out. All of them: the buffer is emptied where it starts,
/// so that it keeps its whole capacity (an `advance` to the end would leave the next write a `reserve` that
/// moves it back, at every request).
#[inline]
fn written(buf: &mut BytesMut, n: usize) {
    if n == buf.len() {
        buf.clear();
    } else {
        buf.advance(n);
    }
}

/// Completes only when the client has gone (end of stream or a broken socket). Bytes it sends meanwhile are
/// kept for later, up to the high-water mark; past it, only the answers are awaited.
pub async fn client_gone(client: &mut Stream, buffer: &mut BytesMut) {
    loop {
        if buffer.len() >= HIGH_WATER {
            return std::future::pending().await;
        }
        buffer.reserve(4096);
        match client.read_buf(buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client buffer read to the very end of its allocation has no capacity left. That must not look like
    /// parked buffers: the bytes still owed to the server (a COPY streamed through) and to the client stay.
    #[tokio::test]
    async fn a_buffer_read_to_its_end_does_not_park_the_others() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut io = Duplex::new(Stream::Plain(tcp));
        io.take_buffers();
        let full = io.from_client.capacity();
        io.from_client.resize(full, b'd');
        io.to_server.extend_from_slice(&io.from_client.clone());
        io.from_client.advance(full);
        assert_eq!(io.from_client.capacity(), 0);
        io.to_client.extend_from_slice(b"owed to the client");
        peer.write_all(b"x").await.unwrap();
        let watch = Watch {
            server: false,
            idle: None,
            deadline: None,
            kick: None,
        };
        io.wait(None, watch).await;
        assert_eq!(
            io.to_server.len(),
            full,
            "bytes owed to the server were dropped"
        );
        // Owed to the client: still buffered, or written to it.
        if io.to_client.is_empty() {
            let mut got = [0u8; 18];
            tokio::io::AsyncReadExt::read_exact(&mut peer, &mut got)
                .await
                .unwrap();
            assert_eq!(&got, b"owed to the client");
        } else {
            assert_eq!(&io.to_client[..], b"owed to the client");
        }
    }
}
