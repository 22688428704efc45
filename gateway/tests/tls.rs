//! Client-facing TLS with a certificate the test makes (openssl): psql with sslmode=verify-full and
//! tokio-postgres over rustls get through; with `tls.mode: require` a plain client is refused with 28000.

mod common;

use common::PASSWORD;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

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
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "cert.pem",
        ],
    );
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
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
    // With mode allow, a plain client is served too.
    let plain = gw.connect().await;
    let one: i32 = plain.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_certificate_is_refused_at_load_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let text = format!(
        "listen: 127.0.0.1:0\nprimary: postgres://127.0.0.1:5432/x\nauth: {{ method: trust }}\n\
         tls: {{ mode: require, cert: {0}, key: {0} }}\n",
        bad.display()
    );
    let error = regiongate::config::Config::parse(&text, "test")
        .expect_err("a broken certificate must be refused")
        .to_string();
    assert!(error.contains("tls.cert"), "{error}");
    let text =
        "listen: 127.0.0.1:0\nprimary: postgres://127.0.0.1:5432/x\nauth: { method: trust }\n\
                tls: { mode: allow }\n";
    let error = regiongate::config::Config::parse(text, "test")
        .expect_err("TLS without a certificate must be refused")
        .to_string();
    assert!(error.contains("tls.cert and tls.key"), "{error}");
}
