//! The operator's HTTP listener: `/metrics` (Prometheus text format), `/healthz` (the process serves) and
//! `/readyz` (the configuration is loaded, the primary accepts connections, and the gateway is not draining). Three GET routes need no web
//! framework: one request per connection, answered and closed.

use crate::metrics::METRICS;
use crate::Shared;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listener up");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(shared, stream)).await;
        });
    }
}

async fn answer(shared: Arc<Shared>, mut stream: TcpStream) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // The request line and headers; bodies are not read (GET only).
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", METRICS.render()),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => match readiness(&shared).await {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
            Err(reason) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// What `/readyz` answers: ready unless the gateway drains (load balancers then stop sending clients at
/// once), or it could serve nothing: the node that takes writes does not accept a TCP connection now, or no
/// node takes writes and no replica answers. While the primary is down and replicas answer, it stays ready:
/// reads go on (see README, "When the primary fails").
pub async fn readiness(shared: &Shared) -> Result<(), String> {
    if shared.drain.phase() != crate::drain::Phase::Serving {
        return Err("draining (shutting down)".to_string());
    }
    let regions = shared.regions();
    let picture = regions.picture();
    match &picture.writer {
        regions::Writer::Node { url, .. } => reachable(url).await,
        regions::Writer::Refused { why } if !picture.replicas.iter().any(|r| r.up) => {
            Err(format!("{why}; and no replica answers"))
        }
        regions::Writer::Refused { .. } => Ok(()),
    }
}

async fn reachable(primary: &crate::config::ServerUrl) -> Result<(), String> {
    match tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect((primary.host.as_str(), primary.port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("primary {primary}: {e}")),
        Err(_) => Err(format!("primary {primary}: connect timed out")),
    }
}
