//! `idle_clients PORT USER DATABASE N [QUERY]`: opens N client connections to a proxy on 127.0.0.1:PORT, logs
//! each in (trust authentication: a StartupMessage, then the answers up to ReadyForQuery), runs QUERY once on
//! each when it is given (a client that did something, then went idle), and keeps them open, idle.
//! Prints `logged-in N SECONDS` once all are in, then waits for a line (or the end) on stdin and exits,
//! closing them. Used by `benches/idle.sh` to measure what an idle client costs a proxy.
//!
//! With `IDLE_TLS=1` each client asks for TLS (SSLRequest) and logs in over it, without verifying the
//! proxy's certificate (as `sslmode=require`).
//!
//! A socket bound to a source address before it connects takes a port no other socket of that address holds,
//! connections closed a moment ago included (TIME_WAIT), and one address has about 28,000: so the connections
//! come from many addresses of 127.0.0.0/8 (all loopback), 1,000 per address, starting at an address picked
//! from the process id, so that runs one after the other do not meet each other's closed ports.

use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

/// A client's connection, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Logins in flight at once.
const CONCURRENCY: usize = 256;
const PER_SOURCE_ADDRESS: usize = 1_000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (port, user, database, count, query) = match args.as_slice() {
        [port, user, database, count] => (port, user, database, count, None),
        [port, user, database, count, query] => (port, user, database, count, Some(query)),
        _ => bail!("usage: idle_clients PORT USER DATABASE N [QUERY]"),
    };
    let port: u16 = port.parse().context("PORT")?;
    let count: usize = count.parse().context("N")?;
    let startup = Arc::new(startup_message(user, database));
    let query = Arc::new(query.map(|q| query_message(q)));
    let tls = match std::env::var("IDLE_TLS").as_deref() {
        Ok("1") => Some(TlsConnector::from(
            regions::ServerTls::with_mode(regions::ServerTlsMode::Require)
                .client_config()
                .map_err(anyhow::Error::msg)?,
        )),
        _ => None,
    };
    let started = Instant::now();
    let mut clients = Vec::with_capacity(count);
    let mut logins = tokio::task::JoinSet::new();
    for i in 0..count {
        if logins.len() >= CONCURRENCY {
            clients.push(logins.join_next().await.expect("one in flight")??);
        }
        let (startup, query, tls) = (startup.clone(), query.clone(), tls.clone());
        logins.spawn(async move {
            let mut stream = log_in(i, port, &startup, tls).await?;
            if let Some(query) = query.as_deref() {
                stream.write_all(query).await?;
                read_to_ready(i, &mut stream).await?;
            }
            Ok::<_, anyhow::Error>(stream)
        });
    }
    while let Some(client) = logins.join_next().await {
        clients.push(client??);
    }
    println!(
        "logged-in {} {:.3}",
        clients.len(),
        started.elapsed().as_secs_f64()
    );
    let mut line = String::new();
    let _ = tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await;
    drop(clients);
    Ok(())
}

fn startup_message(user: &str, database: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes()); // protocol 3.0
    for (key, value) in [("user", user), ("database", database)] {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    message
}

fn query_message(text: &str) -> Vec<u8> {
    let mut message = vec![b'Q'];
    message.extend_from_slice(&((text.len() + 5) as i32).to_be_bytes());
    message.extend_from_slice(text.as_bytes());
    message.push(0);
    message
}

/// Connects (from the i-th client's source address), over TLS when `tls` is given, and reads the login
/// answers up to ReadyForQuery.
async fn log_in(
    i: usize,
    port: u16,
    startup: &[u8],
    tls: Option<TlsConnector>,
) -> Result<Box<dyn Io>> {
    let address = (std::process::id() as usize % 200) * 100 + i / PER_SOURCE_ADDRESS;
    let source = Ipv4Addr::new(127, 1 + (address >> 8) as u8, address as u8, 2);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let stream = socket
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .with_context(|| format!("client {i}: connect"))?;
    let mut stream: Box<dyn Io> = match tls {
        None => Box::new(stream),
        Some(tls) => {
            // SSLRequest: length 8, code 80877103; the answer is one byte, S to go on with TLS.
            let mut stream = stream;
            stream.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await?;
            if stream.read_u8().await? != b'S' {
                bail!("client {i}: the proxy refused TLS");
            }
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
            Box::new(
                tls.connect(name, stream)
                    .await
                    .with_context(|| format!("client {i}: TLS handshake"))?,
            )
        }
    };
    stream.write_all(startup).await?;
    read_to_ready(i, &mut stream).await?;
    Ok(stream)
}

/// Reads messages up to ReadyForQuery; an ErrorResponse is an error.
async fn read_to_ready(i: usize, stream: &mut Box<dyn Io>) -> Result<()> {
    loop {
        let tag = stream
            .read_u8()
            .await
            .with_context(|| format!("client {i}: login"))?;
        let len = stream.read_i32().await? as usize;
        let mut body = vec![0; len.saturating_sub(4)];
        stream.read_exact(&mut body).await?;
        match tag {
            b'Z' => return Ok(()),
            b'E' => bail!("client {i}: refused: {}", String::from_utf8_lossy(&body)),
            b'R' if body.get(..4) != Some(&[0, 0, 0, 0]) => {
                bail!("client {i}: the proxy asks for a password; use trust authentication")
            }
            _ => {}
        }
    }
}
