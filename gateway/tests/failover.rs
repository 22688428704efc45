//! When the primary fails: reads go on from the replicas, writes fail fast with 57P03, and follow a promoted
//! replica; a split brain gets no writes. Real PostgreSQL 15 (one primary, two streaming replicas, each in a
//! region of its own), the gateway binary, tokio-postgres clients.

mod common;

use common::{Process, PASSWORD};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testbed::{Cluster, ClusterOptions};
use tokio_postgres::{AsyncMessage, Client, NoTls};

const INTERVAL: Duration = Duration::from_millis(200);

struct Topology {
    primary: Cluster,
    r1: Cluster,
    r2: Cluster,
    gateway: Process,
    port: u16,
}

fn start() -> (Cluster, Cluster, Cluster) {
    let primary = Cluster::start(&ClusterOptions::default()).expect("starting the primary");
    primary.create_user_and_db("app", PASSWORD, "app").unwrap();
    primary
        .psql("app", "CREATE TABLE acks (id bigint PRIMARY KEY)")
        .unwrap();
    let r1 = primary.start_replica().expect("starting replica 1");
    let r2 = primary.start_replica().expect("starting replica 2");
    (primary, r1, r2)
}

async fn topology(name: &str) -> Topology {
    let (primary, r1, r2) = start();
    let dir =
        std::env::temp_dir().join(format!("regiongate-failover-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = testbed::free_port().unwrap();
    let metrics = testbed::free_port().unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\n\
             primary: {{ url: 'postgres://127.0.0.1:{}/app', region: us-east }}\n\
             home_region: eu-west\n\
             regions:\n  - {{ name: eu-west, replicas: [ 'postgres://127.0.0.1:{}/app' ] }}\n  \
             - {{ name: ap-south, replicas: [ 'postgres://127.0.0.1:{}/app' ] }}\n\
             routing: {{ max_lag: 1s, monitor_interval: {}ms, outage_max_lag: 5m }}\n\
             auth: {{ method: scram-sha-256, users: [ {{ name: app, password: {PASSWORD} }} ] }}\n\
             admin: {{ users: [ app ] }}\n\
             metrics: {{ listen: '127.0.0.1:{metrics}' }}\n",
            primary.port(),
            r1.port(),
            r2.port(),
            INTERVAL.as_millis()
        ),
    )
    .unwrap();
    let gateway = Process::start(&config, metrics, "gateway").await;
    Topology {
        primary,
        r1,
        r2,
        gateway,
        port,
    }
}

/// A client of the gateway; the NOTICEs it receives are collected.
async fn client(port: u16) -> (Client, Arc<Mutex<Vec<String>>>) {
    let (client, mut connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user=app password={PASSWORD} dbname=app connect_timeout=5"
        ),
        NoTls,
    )
    .await
    .expect("logging in through the gateway");
    let notices = Arc::new(Mutex::new(Vec::new()));
    let seen = notices.clone();
    tokio::spawn(async move {
        while let Some(message) =
            futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await
        {
            match message {
                Ok(AsyncMessage::Notice(notice)) => {
                    seen.lock().unwrap().push(notice.message().to_string())
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, notices)
}

/// What the mixed load saw: reads and their failures, acknowledged writes, and writes refused.
#[derive(Default)]
struct Load {
    reads: AtomicU64,
    failed_reads: Mutex<Vec<String>>,
    acked: Mutex<Vec<i64>>,
    refused: Mutex<Vec<(Instant, String, Duration)>>,
    writing: AtomicBool,
    stop: AtomicBool,
}

/// Four readers and one writer, until `load.stop`. Writers write only while `load.writing`.
fn mixed_load(port: u16, load: &Arc<Load>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            let (reader, _) = client(port).await;
            while !load.stop.load(Ordering::Relaxed) {
                match reader.query_one("SELECT count(*) FROM acks", &[]).await {
                    Ok(_) => {
                        load.reads.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        let message = error.as_db_error().map(|e| e.message().to_string());
                        load.failed_reads.lock().unwrap().push(format!(
                            "{} {}",
                            common::sqlstate(&error),
                            message.unwrap_or_else(|| error.to_string())
                        ));
                        if reader.is_closed() {
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let load = load.clone();
    tasks.push(tokio::spawn(async move {
        let (mut writer, _) = client(port).await;
        let mut next = 1i64;
        while !load.stop.load(Ordering::Relaxed) {
            if !load.writing.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            if writer.is_closed() {
                writer = client(port).await.0;
            }
            let sent = Instant::now();
            match writer
                .execute("INSERT INTO acks VALUES ($1)", &[&next])
                .await
            {
                Ok(_) => load.acked.lock().unwrap().push(next),
                Err(error) => {
                    let code = common::sqlstate(&error);
                    let message = error
                        .as_db_error()
                        .map(|e| e.message().to_string())
                        .unwrap_or_else(|| error.to_string());
                    load.refused.lock().unwrap().push((
                        sent,
                        format!("{code} {message}"),
                        sent.elapsed(),
                    ));
                }
            }
            next += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }));
    tasks
}

/// The WAL position the primary wrote so far, replayed by `replica` (after the writer paused).
fn wait_replayed(primary: &Cluster, replica: &Cluster) {
    let lsn = primary.psql("app", "SELECT pg_current_wal_lsn()").unwrap();
    let caught_up = testbed::wait_until(Duration::from_secs(20), || {
        replica
            .psql(
                "app",
                &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'"),
            )
            .is_ok_and(|t| t == "t")
    });
    assert!(caught_up, "the replica never replayed {lsn}");
}

async fn write(port: u16, id: i64) -> Result<(), String> {
    let (c, _) = client(port).await;
    c.execute("INSERT INTO acks VALUES ($1)", &[&id])
        .await
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{} {}",
                common::sqlstate(&e),
                e.as_db_error().map(|d| d.message()).unwrap_or_default()
            )
        })
}

async fn admin_rows(port: u16, command: &str) -> Vec<Vec<String>> {
    let (admin, _) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=app password={PASSWORD} dbname=regiongate"),
        NoTls,
    )
    .await
    .map(|(c, conn)| {
        tokio::spawn(conn);
        (c, ())
    })
    .unwrap();
    admin
        .simple_query(command)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_fails_reads_go_on_and_writes_follow_the_promoted_replica() {
    let t = topology("promote").await;
    let load = Arc::new(Load::default());
    load.writing.store(true, Ordering::Relaxed);
    let tasks = mixed_load(t.port, &load);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !load.acked.lock().unwrap().is_empty(),
        "no write went through before the outage"
    );

    // 1. The primary stops. The writer pauses first, and the replicas replay what it wrote: with
    // asynchronous replication a crash may lose the tail the replicas had not received, which no proxy can
    // bring back; the check below is that the gateway loses nothing it acknowledged.
    load.writing.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    wait_replayed(&t.primary, &t.r1);
    let reads_before = load.reads.load(Ordering::Relaxed);
    t.primary.stop_immediate().unwrap();
    let stopped = Instant::now();
    load.writing.store(true, Ordering::Relaxed);

    // From one second after the stop, every write is refused with 57P03 saying why, and at once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refusals = load.refused.lock().unwrap().clone();
    let settled: Vec<_> = refusals
        .iter()
        .filter(|(sent, _, _)| sent.duration_since(stopped) >= Duration::from_secs(1))
        .collect();
    assert!(settled.len() > 20, "{refusals:?}");
    for (_, error, took) in &settled {
        assert!(
            error.starts_with("57P03 regiongate: no primary: "),
            "{error}"
        );
        assert!(
            *took < Duration::from_millis(500),
            "a refusal took {took:?}"
        );
    }
    let first_57p03 = refusals
        .iter()
        .find(|(_, error, _)| error.starts_with("57P03"))
        .map(|(sent, _, _)| sent.duration_since(stopped));
    eprintln!(
        "after the primary stopped: first 57P03 at {first_57p03:?}; errors before it: {:?}",
        refusals
            .iter()
            .take_while(|(_, e, _)| !e.starts_with("57P03"))
            .map(|(_, e, _)| e)
            .collect::<Vec<_>>()
    );

    // New clients log in, and reads go on: more than the 1 s budget after the last heartbeat, each answer
    // carries a NOTICE with how stale it may be.
    let (late, notices) = client(t.port).await;
    let count: i64 = late
        .query_one("SELECT count(*) FROM acks", &[])
        .await
        .expect("a read during the outage")
        .get(0);
    assert!(count > 0);
    let notice = notices.lock().unwrap().last().cloned().unwrap_or_default();
    assert!(
        notice.contains("may be up to") && notice.contains("no primary"),
        "no staleness NOTICE: {notice:?}"
    );
    let stale: f64 = notice
        .split("may be up to ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(
        stale >= 1.0 && stale <= stopped.elapsed().as_secs_f64() + 1.0,
        "reported staleness {stale} s, {:?} after the primary stopped",
        stopped.elapsed()
    );
    assert!(load.reads.load(Ordering::Relaxed) > reads_before + 50);
    // Still ready for a load balancer: it serves reads.
    let ready = t.gateway.http("/readyz").unwrap();
    assert!(ready.0.contains("200"), "{ready:?}");
    let replicas = admin_rows(t.port, "SHOW REPLICAS").await;
    assert_eq!(replicas[0][3], "down", "{replicas:?}");
    assert_eq!(replicas[0][4], "down", "{replicas:?}");
    assert_eq!(replicas[0][6], "false", "{replicas:?}");

    // 2. Replica 1 is promoted, replica 2 follows it. Writes go there within two monitor intervals.
    load.writing.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let promoted_at = {
        t.r1.psql("app", "SELECT pg_promote()").unwrap();
        Instant::now()
    };
    let mut taken = None;
    for id in 1_000_000.. {
        if write(t.port, id).await.is_ok() {
            taken = Some(promoted_at.elapsed());
            load.acked.lock().unwrap().push(id);
            break;
        }
        assert!(
            promoted_at.elapsed() < Duration::from_secs(10),
            "writes never followed the promotion"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let taken = taken.unwrap();
    eprintln!("writes resumed {taken:?} after pg_promote() returned");
    assert!(
        taken < INTERVAL * 2 + Duration::from_millis(300),
        "{taken:?}"
    );
    t.r2.psql(
        "app",
        &format!(
            "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={} user=postgres password={}'",
            t.r1.port(),
            testbed::SUPERUSER_PASSWORD
        ),
    )
    .unwrap();
    t.r2.psql("app", "SELECT pg_reload_conf()").unwrap();
    load.writing.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failover = t.gateway.log();
    assert!(
        failover.contains("failover: writes go to a new primary"),
        "{failover}"
    );

    // Reads route by the new primary's positions: replica 2, following it, is within the budget again.
    let fresh = common::eventually(Duration::from_secs(20), || async {
        let rows = admin_rows(t.port, "SHOW REPLICAS").await;
        let r2 = &rows[2];
        r2[3] == "up"
            && r2[4] == "standby"
            && r2[5] == "2"
            && r2[7].parse::<f64>().is_ok_and(|lag| lag < 1.0)
    })
    .await;
    assert!(
        fresh,
        "replica 2 never caught up with the new primary: {:?}",
        admin_rows(t.port, "SHOW REPLICAS").await
    );
    let rows = admin_rows(t.port, "SHOW REPLICAS").await;
    assert_eq!(
        (
            rows[1][4].as_str(),
            rows[1][5].as_str(),
            rows[1][6].as_str()
        ),
        ("primary", "2", "true"),
        "{rows:?}"
    );

    // 3. The old primary comes back on its own, read-write: a split brain. No write reaches it, and writes
    // are refused naming both, until it is gone again.
    load.writing.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A transaction in flight on the new primary when it stops taking writes.
    let (in_flight, _) = client(t.port).await;
    in_flight.batch_execute("BEGIN").await.unwrap();
    in_flight
        .execute("INSERT INTO acks VALUES (4000000)", &[])
        .await
        .unwrap();
    t.primary.restart().unwrap();
    let on_old = t.primary.psql("app", "SELECT count(*) FROM acks").unwrap();
    let split = common::eventually(Duration::from_secs(10), || async {
        write(t.port, 2_000_000)
            .await
            .is_err_and(|e| e.contains("split brain"))
    })
    .await;
    assert!(split, "no split brain seen");
    let error = write(t.port, 2_000_001).await.unwrap_err();
    assert!(
        error.starts_with("57P03")
            && error.contains(&format!("127.0.0.1:{} (timeline 1)", t.primary.port()))
            && error.contains(&format!("127.0.0.1:{} (timeline 2)", t.r1.port())),
        "{error}"
    );
    assert_eq!(
        t.primary.psql("app", "SELECT count(*) FROM acks").unwrap(),
        on_old
    );
    // Its transaction ends with an error at its next statement; nothing of it committed anywhere.
    let cut = in_flight.batch_execute("COMMIT").await.unwrap_err();
    let cut = format!(
        "{} {}",
        common::sqlstate(&cut),
        cut.as_db_error().map(|e| e.message()).unwrap_or_default()
    );
    assert!(
        cut.starts_with("08006 regiongate: the server this session ran on"),
        "{cut}"
    );
    assert!(cut.contains("was not committed"), "{cut}");
    t.primary.stop_immediate().unwrap();
    let resumed = common::eventually(Duration::from_secs(10), || async {
        write(t.port, 3_000_000).await.is_ok()
    })
    .await;
    assert!(resumed, "writes did not resume after the split brain");
    load.acked.lock().unwrap().push(3_000_000);
    load.writing.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;

    load.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    // Not one read failed, through the crash, the promotion and the split brain.
    assert_eq!(*load.failed_reads.lock().unwrap(), Vec::<String>::new());
    // Every acknowledged write is on the new primary.
    let acked = load.acked.lock().unwrap().clone();
    let present: i64 =
        t.r1.psql(
            "app",
            &format!(
                "SELECT count(*) FROM acks WHERE id IN ({})",
                acked
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        )
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(present as usize, acked.len());
    assert_eq!(
        t.r1.psql("app", "SELECT count(*) FROM acks WHERE id = 4000000")
            .unwrap(),
        "0"
    );
    let metrics = t.gateway.http("/metrics").unwrap().1;
    assert!(
        metrics.contains("regiongate_failovers_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("regiongate_stale_reads_total{region="),
        "no stale reads counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_by_themselves_when_the_primary_comes_back() {
    let t = topology("back").await;
    write(t.port, 1).await.unwrap();
    // A client connected through the outage: its session's pool on the primary is retired meanwhile.
    let (staying, _) = client(t.port).await;
    staying
        .execute("INSERT INTO acks VALUES (10)", &[])
        .await
        .unwrap();
    t.primary.stop_immediate().unwrap();
    let refused = common::eventually(Duration::from_secs(5), || async {
        write(t.port, 2)
            .await
            .is_err_and(|e| e.starts_with("57P03"))
    })
    .await;
    assert!(
        refused,
        "writes were not refused while the primary was down"
    );
    t.primary.restart().unwrap();
    let resumed = common::eventually(Duration::from_secs(10), || async {
        write(t.port, 3).await.is_ok()
    })
    .await;
    assert!(resumed, "writes did not resume:\n{}", t.gateway.log());
    assert!(t.gateway.log().contains("the primary takes writes again"));
    // The client that stayed runs whole transactions again, on a fresh pool.
    for id in [11, 12] {
        staying
            .batch_execute(&format!(
                "BEGIN; INSERT INTO acks VALUES ({id}); INSERT INTO acks VALUES ({})",
                id + 100
            ))
            .await
            .unwrap();
        staying.batch_execute("COMMIT").await.unwrap();
    }
    let _ = (&t.r1, &t.r2);
}
