//! TLS with certificates the test makes (openssl). Client-facing: psql with sslmode=verify-full and
//! tokio-postgres over rustls get through; with `tls.mode: require` a plain client is refused with 28000.
//! Server side: a primary and a replica that accept TCP clients over TLS only serve every kind of gateway
//! connection under `server_tls.mode: verify-full`; certificates that do not verify are refused with 08006.

mod common;

use common::PASSWORD;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A test CA, and a server certificate it signed for localhost and 127.0.0.1 with its key: (CA, cert, key).
fn certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=regiongate test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    let (cert, key) = signed(dir, "server", "localhost", "DNS:localhost,IP:127.0.0.1");
    (dir.join("ca.pem"), cert, key)
}

/// A server certificate for `names` (subjectAltName syntax) signed by the CA in `dir`: (cert, key), files
/// named after `stem`.
fn signed(dir: &Path, stem: &str, common_name: &str, names: &str) -> (PathBuf, PathBuf) {
    let (key, csr, ext, cert) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.ext"),
        format!("{stem}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={common_name}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName={names}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ],
    );
    (dir.join(cert), dir.join(key))
}

async fn tls_gateway(mode: &str, dir: &Path) -> (common::TestGateway, PathBuf) {
    let (ca, cert, key) = certificate(dir);
    let gw = common::gateway(
        "tls",
        &format!(
            "tls: {{ mode: {mode}, cert: {}, key: {} }}\n",
            cert.display(),
            key.display()
        ),
    )
    .await;
    (gw, ca)
}

fn psql(gw: &common::TestGateway, conninfo: &str, sql: &str) -> Output {
    Command::new("psql")
        .env("PGPASSWORD", PASSWORD)
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "{conninfo} port={} user={db} dbname={db}",
            gw.addr.port(),
            db = gw.database
        ))
        .args(["-c", sql])
        .output()
        .expect("running psql")
}

fn rustls_connector(cert: &Path) -> tokio_postgres_rustls::MakeRustlsConnect {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_verify_full_works_and_plain_clients_are_refused_when_tls_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, cert) = tls_gateway("require", dir.path()).await;
    let verified = psql(
        &gw,
        &format!(
            "host=localhost sslmode=verify-full sslrootcert={}",
            cert.display()
        ),
        "SELECT 'through TLS'",
    );
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&verified.stdout).trim(),
        "through TLS"
    );
    let info = psql(&gw, "host=127.0.0.1 sslmode=require", "\\conninfo");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("SSL connection (protocol: TLSv1.3"), "{info}");

    let plain = psql(&gw, "host=127.0.0.1 sslmode=disable", "SELECT 1");
    assert!(!plain.status.success());
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(stderr.contains("regiongate requires TLS"), "{stderr}");
    // A client checking the certificate against a root it does not trust never gets in.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = certificate(&other_dir);
    let untrusted = psql(
        &gw,
        &format!(
            "host=localhost sslmode=verify-full sslrootcert={}",
            other.0.display()
        ),
        "SELECT 1",
    );
    assert!(!untrusted.status.success());
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("certificate verify failed"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_rustls_moves_large_results_and_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, cert) = tls_gateway("allow", dir.path()).await;
    let config = format!("{} sslmode=require", gw.config());
    let (client, connection) = tokio_postgres::connect(&config, rustls_connector(&cert))
        .await
        .unwrap();
    tokio::spawn(connection);
    // 20 MB of rows: more than any buffer on the way, so TLS records are written under backpressure.
    let rows = client
        .query(
            "SELECT repeat(md5(i::text), 31250) FROM generate_series(1, 20) AS i",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 20);
    assert!(rows
        .iter()
        .all(|r| r.get::<_, String>(0).len() == 1_000_000));
    // The extended protocol and a transaction over TLS, then COPY FROM STDIN.
    client
        .batch_execute("CREATE TABLE t (n int, s text)")
        .await
        .unwrap();
    let insert = client
        .prepare("INSERT INTO t VALUES ($1, $2)")
        .await
        .unwrap();
    for n in 0..100i32 {
        client.execute(&insert, &[&n, &"x"]).await.unwrap();
    }
    use futures_util::SinkExt;
    let sink = client.copy_in("COPY t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for n in 100..10_100 {
        data.push_str(&format!("{n}\tcopied\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 10_000);
    let count: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 10_100);
    // An idle TLS client's buffers go to the stock, and its next bytes are decrypted into a 4 KB probe first:
    // a statement of many TLS records, sent after a pause, arrives whole.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let long = format!("SELECT length('{}')", "y".repeat(60_000));
    let length: i32 = client.query_one(&long, &[]).await.unwrap().get(0);
    assert_eq!(length, 60_000);
    // With mode allow, a plain client is served too.
    let plain = gw.connect().await;
    let one: i32 = plain.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_certificate_is_refused_at_startup_and_reload_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let plain =
        "listen: 127.0.0.1:0\nprimary: postgres://127.0.0.1:5432/x\nauth: { method: trust }\n";
    let broken = format!(
        "{plain}tls: {{ mode: require, cert: {0}, key: {0} }}\n",
        bad.display()
    );
    let config = regiongate::config::Config::parse(&broken, "test")
        .expect("the file is valid: its certificate is loaded where it is taken into use");
    let error = match regiongate::Gateway::bind(config).await {
        Ok(_) => panic!("a broken certificate must be refused"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("tls.cert") && error.contains("line 4"),
        "{error}"
    );
    // A reload to a broken certificate is refused too, and the gateway keeps running without it.
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, plain).unwrap();
    let config = regiongate::config::Config::load(&file).unwrap();
    let gateway = regiongate::Gateway::bind_from(config, Some(file.clone()))
        .await
        .unwrap();
    std::fs::write(&file, &broken).unwrap();
    let error = gateway
        .shared
        .reload()
        .expect_err("a broken certificate must refuse the reload");
    assert!(
        matches!(error, regiongate::ReloadError::Invalid(_))
            && error.to_string().contains("tls.cert"),
        "{error}"
    );
    assert!(gateway.shared.tls.load().is_none());
    let text = format!("{plain}tls: {{ mode: allow }}\n");
    let error = regiongate::config::Config::parse(&text, "test")
        .expect_err("TLS without a certificate must be refused")
        .to_string();
    assert!(error.contains("tls.cert and tls.key"), "{error}");
}

/// A primary serving TLS with `cert`/`key` and TCP clients over TLS only, and a replica that inherits both.
async fn tls_only_servers(cert: PathBuf, key: PathBuf, replica: bool) -> Vec<testbed::Cluster> {
    tokio::task::spawn_blocking(move || {
        let primary = testbed::Cluster::start(&testbed::ClusterOptions {
            tls: Some((cert, key)),
            ..Default::default()
        })
        .expect("starting a TLS-only PostgreSQL");
        let mut servers = Vec::new();
        if replica {
            servers.push(primary.start_replica().expect("starting its replica"));
        }
        servers.insert(0, primary);
        servers
    })
    .await
    .unwrap()
}

/// A gateway in front of `servers` (primary first, then replicas in region `home`), logging in as the
/// superuser, with `server_tls` and whatever `extra` adds.
async fn gateway_to(
    servers: &[testbed::Cluster],
    server_tls: &str,
    extra: &str,
) -> common::TestGateway {
    let url = |c: &testbed::Cluster| {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/postgres",
            testbed::SUPERUSER_PASSWORD,
            c.port()
        )
    };
    let replicas: Vec<String> = servers[1..]
        .iter()
        .map(|c| format!("'{}'", url(c)))
        .collect();
    let text = format!(
        "listen: 127.0.0.1:0\nprimary: {{ url: '{}', region: home }}\nhome_region: home\n\
         regions:\n  - {{ name: home, replicas: [ {} ] }}\n\
         routing: {{ monitor_interval: 100ms }}\n\
         auth: {{ method: trust, users: [ {{ name: postgres }} ] }}\n\
         server_tls: {server_tls}\n{extra}",
        url(&servers[0]),
        replicas.join(", ")
    );
    common::gateway_from(&text, "postgres").await
}

async fn gateway_client(gw: &common::TestGateway) -> tokio_postgres::Client {
    common::connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        gw.addr.port()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_connection_verifies_tls_when_the_servers_accept_only_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate(dir.path());
    let servers = tls_only_servers(cert, key, true).await;
    servers[0]
        .psql(
            "postgres",
            "CREATE TABLE events (kind text NOT NULL, n int NOT NULL)",
        )
        .unwrap();
    let gw = gateway_to(
        &servers,
        &format!("{{ mode: verify-full, ca: {} }}", ca.display()),
        "batching: { tables: [events], alone: false }\n\
         views:\n  - { name: event_counts, query: 'SELECT kind, count(*) AS rows FROM events GROUP BY kind', \
         unique_key: [kind], schedule: every 1s }\n",
    )
    .await;
    let client = gateway_client(&gw).await;

    // A write runs on the primary over a pooled connection: TLS, as pg_stat_ssl there says.
    let row = client
        .query_one(
            "INSERT INTO events SELECT 'ssl ' || ssl::text, 0 FROM pg_stat_ssl WHERE pid = pg_backend_pid() \
             RETURNING kind",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ssl true");

    // Batched inserts flush on the batch pool's own connections.
    let mut tasks = Vec::new();
    for n in 0..40i32 {
        let config = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            gw.addr.port()
        );
        tasks.push(tokio::spawn(async move {
            let client = common::connect(&config).await;
            client
                .execute("INSERT INTO events (kind, n) VALUES ('batched', $1)", &[&n])
                .await
                .unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let batched = servers[0]
        .psql(
            "postgres",
            "SELECT count(*) FROM events WHERE kind = 'batched'",
        )
        .unwrap();
    assert_eq!(batched.trim(), "40");

    // Reads reach the replica once its monitor (a side connection) measured its lag: over TLS too.
    let on_replica = common::eventually(Duration::from_secs(20), || async {
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        assert!(row.get::<_, bool>(1), "a pooled connection without TLS");
        row.get::<_, bool>(0)
    })
    .await;
    assert!(on_replica, "reads never went to the replica");

    // The view is refreshed on the views' own side connections, and read (from the replica) with every
    // batched row in it.
    let refreshed = common::eventually(Duration::from_secs(20), || async {
        client
            .query_opt("SELECT rows FROM event_counts WHERE kind = 'batched'", &[])
            .await
            .ok()
            .flatten()
            .is_some_and(|row| row.get::<_, i64>(0) == 40)
    })
    .await;
    assert!(
        refreshed,
        "the view was never refreshed with the batched rows"
    );

    // The server offered SCRAM-SHA-256-PLUS over TLS, and the gateway bound its logins to the channel: had
    // its tls-server-end-point data been wrong, the server would have refused them.
    let bound = regiongate::metrics::METRICS
        .server_logins
        .with_label_values(&["scram-sha-256-plus", "yes"])
        .get();
    assert!(bound > 0, "no server login used channel binding");

    // A cancel reaches a server that takes only TLS clients (CancelRequest is answered before pg_hba).
    let cancel = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel_query(tokio_postgres::NoTls).await
    });
    let error = client
        .batch_execute("BEGIN; SELECT pg_sleep(30); COMMIT")
        .await
        .expect_err("the sleep is cancelled");
    assert_eq!(common::sqlstate(&error), "57014");
    sleeper.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificates_that_do_not_verify_are_refused_with_08006() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = certificate(dir.path());
    // Signed by the CA, but for another host than the one the gateway's URL names.
    let (cert, key) = signed(
        dir.path(),
        "elsewhere",
        "elsewhere.example",
        "DNS:elsewhere.example",
    );
    let servers = tls_only_servers(cert, key, false).await;
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let (other_ca, _, _) = certificate(&other_dir);

    // The gateway reaches the server as the client logs in (for its parameters), so the login fails.
    let refused = |server_tls: String, expected: &'static str| {
        let servers = &servers;
        async move {
            let gw = gateway_to(servers, &server_tls, "").await;
            let error = tokio_postgres::connect(
                &format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres",
                    gw.addr.port()
                ),
                tokio_postgres::NoTls,
            )
            .await
            .err()
            .expect("the server's certificate must not verify");
            assert_eq!(common::sqlstate(&error), "08006", "{server_tls}: {error:?}");
            let message = error.as_db_error().unwrap().message().to_string();
            assert!(message.contains(expected), "{server_tls}: {message}");
        }
    };
    refused(
        format!("{{ mode: verify-full, ca: {} }}", ca.display()),
        "not valid for name",
    )
    .await;
    refused(
        format!("{{ mode: verify-ca, ca: {} }}", other_ca.display()),
        "invalid peer certificate",
    )
    .await;

    // The same certificate passes where the name is not checked (verify-ca) or nothing is (require).
    for server_tls in [
        format!("{{ mode: verify-ca, ca: {} }}", ca.display()),
        "{ mode: require }".to_string(),
    ] {
        let gw = gateway_to(&servers, &server_tls, "").await;
        let client = gateway_client(&gw).await;
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{server_tls}: {e:?}"))
            .get(0);
        assert!(ssl);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_tls_is_refused_when_tls_is_required_and_used_plain_when_preferred() {
    let gw = common::gateway("servertls", "server_tls: { mode: require }\n").await;
    let error = tokio_postgres::connect(&gw.config(), tokio_postgres::NoTls)
        .await
        .err()
        .expect("no TLS, no connection");
    assert_eq!(common::sqlstate(&error), "08006");
    let message = error.as_db_error().unwrap().message().to_string();
    assert!(message.contains("does not accept TLS"), "{message}");

    // The default, prefer, takes the plain connection this server offers.
    let gw = common::gateway("servertls", "").await;
    let ssl: bool = gw
        .connect()
        .await
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ssl);
}

#[test]
fn the_channel_binding_hash_is_the_certificates_sha256_for_an_rsa_sha256_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, _) = certificate(dir.path());
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap();
    let ours =
        regiongate::tls::tls_server_end_point(&der).expect("an RSA-SHA256 certificate binds");
    let output = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let fingerprint = String::from_utf8_lossy(&output.stdout);
    let hex: String = fingerprint
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .split(':')
        .collect::<String>()
        .to_lowercase();
    let ours: String = ours.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(ours, hex);
}
