//! What the benchmark programs in `src/bin` share.

use anyhow::{Context, Result};
use tokio_postgres::{Client, NoTls};

/// A tokio-postgres client for `url`, its connection driven in the background.
pub async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| url.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
