//! A TCP relay that puts distance between two loopback addresses: every byte is delivered a configured time
//! after it was sent, in each direction, and the link can be cut (open connections reset, new ones refused)
//! and restored. This machine's kernel has no netem, so latency is made here, in user space.
//!
//! Each connection gets two forwarding directions; each direction is a reader thread that stamps chunks with
//! their due time and a writer thread that sleeps until then, so pipelined traffic keeps flowing while
//! delayed.

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Shared {
    target: SocketAddr,
    /// One-way delay in microseconds.
    delay_us: AtomicU64,
    cut: AtomicBool,
    stopped: AtomicBool,
    /// Open connections (both ends), to reset them when the link is cut.
    streams: Mutex<Vec<TcpStream>>,
}

/// A running relay; stops (and resets its connections) on drop.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Relay {
    /// Listens on a free loopback port and relays to `target` with `one_way` delay each direction.
    pub fn start(target: SocketAddr, one_way: Duration) -> Result<Relay> {
        Relay::bind(SocketAddr::from(([127, 0, 0, 1], 0)), target, one_way)
    }

    /// Listens on `listen` (a fixed address, as the container testbed's links have) and relays to `target`.
    /// The target need not be up yet: each accepted connection dials it then.
    pub fn bind(listen: SocketAddr, target: SocketAddr, one_way: Duration) -> Result<Relay> {
        let listener =
            TcpListener::bind(listen).with_context(|| format!("binding the relay on {listen}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            delay_us: AtomicU64::new(one_way.as_micros() as u64),
            cut: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("relay-{}", addr.port()))
            .spawn(move || accept_loop(listener, accept_shared))?;
        Ok(Relay { addr, shared })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Changes the one-way delay (applies to bytes sent from now on).
    pub fn set_delay(&self, one_way: Duration) {
        self.shared
            .delay_us
            .store(one_way.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cuts the link: resets every open connection and refuses new ones until [`Relay::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        reset_all(&self.shared);
    }

    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// The one-way delay now.
    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.shared.delay_us.load(Ordering::Relaxed))
    }

    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        reset_all(&self.shared);
        // Wake the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn reset_all(shared: &Shared) {
    for stream in shared
        .streams
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
    {
        let _ = stream.shutdown(Shutdown::Both);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            drop(client); // refused: the far side is unreachable
            continue;
        }
        let Ok(server) = TcpStream::connect(shared.target) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut streams = shared.streams.lock().unwrap_or_else(|p| p.into_inner());
            streams.retain(|s| s.peer_addr().is_ok());
            if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
                streams.push(c);
                streams.push(s);
            }
        }
        for (from, to) in [(&client, &server), (&server, &client)] {
            if let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) {
                spawn_direction(from, to, shared.clone());
            }
        }
    }
}

fn spawn_direction(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader_shared = shared.clone();
    let _ = std::thread::Builder::new()
        .name("relay-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let delay =
                            Duration::from_micros(reader_shared.delay_us.load(Ordering::Relaxed));
                        if tx
                            .send((Instant::now() + delay, buf[..n].to_vec()))
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            // Dropping `tx` ends the writer after it delivered what is queued.
        });
    let _ = std::thread::Builder::new()
        .name("relay-write".into())
        .spawn(move || {
            while let Ok((due, chunk)) = rx.recv() {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if shared.cut.load(Ordering::SeqCst) || to.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
}
