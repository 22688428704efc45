//! Read routing against real streaming replication: a primary and replicas in two regions, each behind a
//! latency relay, and a gateway whose home region is eu-west.

mod common;

use regiongate::config::Config;
use regiongate::{Gateway, Shared};
use std::sync::Arc;
use std::time::Duration;
use testbed::{RegionSpec, Topology};
use tokio_postgres::Client;

struct Env {
    topology: Topology,
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    /// The configuration file (a test may rewrite it and reload), and its text.
    config: (std::path::PathBuf, String),
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

const APP_PASSWORD: &str = "secret";

/// us-east primary 20 ms away, eu-west (home) replica 1 ms away, ap-south replica 40 ms away.
async fn start(routing: &str) -> Env {
    start_with(Duration::from_millis(20), routing).await
}

async fn start_with(primary_one_way: Duration, routing: &str) -> Env {
    start_in("eu-west", primary_one_way, routing).await
}

/// The same topology, with the gateway's home region `home`.
async fn start_in(home: &str, primary_one_way: Duration, routing: &str) -> Env {
    let topology = tokio::task::spawn_blocking(move || {
        let topology = Topology::start(
            "us-east",
            primary_one_way,
            &[
                RegionSpec::new("eu-west", 1, Duration::from_millis(1)),
                RegionSpec::new("ap-south", 1, Duration::from_millis(40)),
            ],
        )
        .expect("starting the topology");
        topology
            .primary
            .cluster
            .create_user_and_db("app", APP_PASSWORD, "app")
            .expect("creating the app database");
        topology
    })
    .await
    .unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nhome_region: {home}\n{}auth: {{ method: scram-sha-256, users: [ {{ name: app, password: {APP_PASSWORD} }} ] }}\nadmin: {{ users: [ app ] }}\npool: {{ size: 4 }}\nrouting: {{ monitor_interval: 50ms, {routing} }}\n",
        topology.gateway_yaml("app")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("regiongate.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let gateway = Gateway::bind_from(config, Some(path.clone()))
        .await
        .unwrap();
    let addr = gateway.local_addr();
    let shared = gateway.shared.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async {
        let _ = stopped.await;
    }));
    let env = Env {
        topology,
        shared,
        addr,
        config: (path, yaml),
        _dir: dir,
        _stop: stop,
    };
    env.wait_for_monitors().await;
    env
}

impl Env {
    /// Waits for the monitors' first picture (at the start, and after a reload that changed the regions):
    /// every replica up and fresh.
    async fn wait_for_monitors(&self) {
        let ready = common::eventually(Duration::from_secs(20), || async {
            let picture = self.shared.regions().picture();
            picture.replicas.iter().all(|r| r.up && r.lag.is_some())
        })
        .await;
        assert!(
            ready,
            "replicas never looked healthy: {:?}",
            self.shared.regions().picture()
        );
    }

    async fn client(&self) -> Client {
        common::connect(&format!(
            "host=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=app",
            self.addr.port()
        ))
        .await
    }

    fn port_of(&self, region: &str) -> u16 {
        self.topology
            .replicas()
            .find(|(r, _)| *r == region)
            .map(|(_, n)| n.cluster.port())
            .unwrap()
    }

    fn primary_port(&self) -> u16 {
        self.topology.primary.cluster.port()
    }

    fn eu_west(&self) -> &testbed::Cluster {
        &self.topology.regions[0].replicas[0].cluster
    }

    /// Waits until the monitors see the eu-west replica's lag beyond `lag`.
    async fn wait_eu_west_lag_over(&self, lag: Duration) {
        let lagging = common::eventually(Duration::from_secs(20), || async {
            let picture = self.shared.regions().picture();
            picture.replicas[0].lag.is_some_and(|l| l > lag)
        })
        .await;
        assert!(
            lagging,
            "eu-west never lagged: {:?}",
            self.shared.regions().picture().replicas[0]
        );
    }
}

/// The port of the server that ran a query (each server listens on its own port).
async fn server_port(client: &Client, sql_prefix: &str) -> u16 {
    let row = client
        .query_one(&format!("{sql_prefix}SELECT inet_server_port()"), &[])
        .await
        .unwrap();
    row.get::<_, i32>(0) as u16
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_nearest_replica_and_writes_to_the_primary() {
    let env = start("max_lag: 2s").await;
    let client = env.client().await;
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY); CREATE SEQUENCE ids")
        .await
        .unwrap();
    // A session that has not written reads from the home replica (one that wrote would read its writes, from
    // wherever has them, until the replicas are measured to have replayed them).
    let reader = env.client().await;
    for _ in 0..20 {
        assert_eq!(server_port(&reader, "").await, env.port_of("eu-west"));
    }
    // EXPLAIN with options in parentheses runs the statement when ANALYZE is among them: a write, which a
    // replica would refuse ("cannot execute DELETE in a read-only transaction").
    reader
        .batch_execute("EXPLAIN (ANALYZE, COSTS OFF) DELETE FROM items WHERE id = -1")
        .await
        .expect("EXPLAIN (ANALYZE) of a write goes to the primary");
    // Writes, sequence calls and locking reads would fail on a replica ("read-only transaction"): they must
    // all reach the primary.
    for i in 0..20 {
        client
            .execute("INSERT INTO items VALUES ($1)", &[&i])
            .await
            .unwrap();
        let _: i64 = client
            .query_one("SELECT nextval('ids')", &[])
            .await
            .unwrap()
            .get(0);
        client
            .query("SELECT * FROM items WHERE id = $1 FOR UPDATE", &[&i])
            .await
            .unwrap();
    }
    // A transaction starts where its first statement belongs (a new session: this one wrote, and reads its
    // writes from the primary until the replicas are measured to have replayed them); with
    // `routing.transactions: primary` (tested below) a plain BEGIN runs on the primary.
    let client = env.client().await;
    client.batch_execute("BEGIN").await.unwrap();
    let ports: Vec<u16> = vec![
        server_port(&client, "").await,
        server_port(&client, "").await,
    ];
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(ports, vec![env.port_of("eu-west"); 2]);
    // ...a replica when it is read only, either way it is said.
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(server_port(&client, "").await, env.port_of("eu-west"));
    client.batch_execute("COMMIT").await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("SET TRANSACTION READ ONLY")
        .await
        .unwrap();
    let in_tx = server_port(&client, "").await;
    let read_only: String = client
        .query_one("SHOW transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!((in_tx, read_only.as_str()), (env.port_of("eu-west"), "on"));
    // An operator bans the home replica from the console: reads move on; UNBAN brings them back.
    let eu_west = env.topology.regions[0].replicas[0].addr().to_string();
    let console = format!(
        "host=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=regiongate",
        env.addr.port()
    );
    let admin = common::connect(&console).await;
    admin.simple_query(&format!("BAN {eu_west}")).await.unwrap();
    let replicas = admin.simple_query("SHOW REPLICAS").await.unwrap();
    let banned = replicas.iter().any(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => {
            r.get("server") == Some(eu_west.as_str()) && r.get("state") == Some("banned")
        }
        _ => false,
    });
    assert!(banned, "SHOW REPLICAS does not show the ban");
    let fresh = env.client().await;
    assert_eq!(server_port(&fresh, "").await, env.port_of("ap-south"));
    admin
        .simple_query(&format!("UNBAN {eu_west}"))
        .await
        .unwrap();
    assert_eq!(server_port(&fresh, "").await, env.port_of("eu-west"));
    // The decisions are counted.
    let metrics = regiongate::metrics::METRICS.render();
    assert!(
        metrics.contains(
            "regiongate_routed_total{reason=\"within-budget\",region=\"eu-west\",role=\"replica\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"write\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_over_budget_is_skipped_until_it_catches_up() {
    // A budget that a healthy far replica meets even on a loaded machine (its measured staleness includes the
    // probe's round trip and the heartbeat's).
    let env = start("max_lag: 2s").await;
    let client = env.client().await;
    assert_eq!(
        server_port(&client, "").await,
        env.port_of("eu-west"),
        "primary {} ap-south {} picture {:#?}",
        env.primary_port(),
        env.port_of("ap-south"),
        env.shared.regions().picture()
    );
    env.eu_west().pause_replay().unwrap();
    env.wait_eu_west_lag_over(Duration::from_millis(2500)).await;
    for _ in 0..10 {
        assert_eq!(server_port(&client, "").await, env.port_of("ap-south"));
    }
    // Budgets can be raised per statement and per session.
    assert_eq!(
        server_port(&client, "/* regiongate: max_lag=1h */ ").await,
        env.port_of("eu-west")
    );
    client
        .batch_execute("SET regiongate.max_lag = '1h'")
        .await
        .unwrap();
    assert_eq!(server_port(&client, "").await, env.port_of("eu-west"));
    client
        .batch_execute("RESET regiongate.max_lag")
        .await
        .unwrap();
    assert_eq!(
        server_port(&client, "").await,
        env.port_of("ap-south"),
        "primary {} eu-west {} picture {:#?}",
        env.primary_port(),
        env.port_of("eu-west"),
        env.shared.regions().picture()
    );
    assert_eq!(
        server_port(&client, "/* regiongate: primary */ ").await,
        env.primary_port()
    );
    env.eu_west().resume_replay().unwrap();
    let back = common::eventually(Duration::from_secs(10), || async {
        server_port(&client, "").await == env.port_of("eu-west")
    })
    .await;
    assert!(back, "reads never came back to eu-west");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fitting_replica_is_an_error_when_configured() {
    let env = start("max_lag: 300ms, when_no_replica_fits: error").await;
    let client = env.client().await;
    for (_, node) in env.topology.replicas() {
        node.cluster.pause_replay().unwrap();
    }
    env.wait_eu_west_lag_over(Duration::from_millis(400)).await;
    let stale = common::eventually(Duration::from_secs(10), || async {
        env.shared
            .regions()
            .picture()
            .replicas
            .iter()
            .all(|r| r.lag.is_some_and(|l| l > Duration::from_millis(400)))
    })
    .await;
    assert!(stale);
    let error = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(common::sqlstate(&error), "57P03");
    let message = error.as_db_error().unwrap().message().to_string();
    assert!(
        message.contains("300ms") && message.contains("eu-west") && message.contains("ap-south"),
        "{message}"
    );
    // Writes are unaffected.
    client
        .batch_execute("CREATE TABLE still_writable (x int)")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_always_sees_the_write() {
    // eu-west is paused but within a generous budget: without read-your-writes every read there would miss.
    // The primary is near here so that a thousand round trips stay quick.
    let env = start_with(Duration::ZERO, "max_lag: 1h").await;
    let client = env.client().await;
    client
        .batch_execute("CREATE TABLE notes (id int PRIMARY KEY)")
        .await
        .unwrap();
    env.eu_west().pause_replay().unwrap();
    for i in 0..1000 {
        client
            .execute("INSERT INTO notes VALUES ($1)", &[&i])
            .await
            .unwrap();
        let row = client
            .query_one(
                "SELECT count(*), inet_server_port() FROM notes WHERE id = $1",
                &[&i],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 1, "write {i} not visible");
        assert_ne!(row.get::<_, i32>(1) as u16, env.port_of("eu-west"));
    }
    // A new session has no write to wait for: it reads from the (paused, within budget) home replica.
    let fresh = env.client().await;
    assert_eq!(server_port(&fresh, "").await, env.port_of("eu-west"));
    env.eu_west().resume_replay().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_banned_and_no_read_fails() {
    let env = start("max_lag: 2s").await;
    // A read that got a notice from the replica before it died: the client has had no answer yet, so the
    // read runs again elsewhere. (A replica shut down in immediate mode sends such a WARNING to every
    // connection; one that reached a request in flight used to end its retry.) Declared immutable, the
    // function runs while the statement is planned: its notice comes before any answer (BindComplete,
    // RowDescription) to the client's request.
    env.topology
        .primary
        .cluster
        .psql(
            "app",
            "CREATE FUNCTION noisy_port() RETURNS int IMMUTABLE LANGUAGE plpgsql AS \
             $$ BEGIN RAISE NOTICE 'about to wait'; PERFORM pg_sleep(1); RETURN inet_server_port(); END $$",
        )
        .unwrap();
    let replicated = common::eventually(Duration::from_secs(10), || async {
        env.topology.replicas().all(|(_, node)| {
            node.cluster
                .psql(
                    "app",
                    "SELECT count(*) FROM pg_proc WHERE proname = 'noisy_port'",
                )
                .is_ok_and(|out| out.trim() == "1")
        })
    })
    .await;
    assert!(replicated, "the function never reached the replicas");
    let clients: Vec<Client> = futures_util::future::join_all((0..4).map(|_| env.client())).await;
    for client in &clients {
        assert_eq!(server_port(client, "").await, env.port_of("eu-west"));
    }
    let noisy = {
        let client = env.client().await;
        tokio::spawn(async move {
            let row = client.query_one("SELECT noisy_port()", &[]).await;
            row.map(|row| row.get::<_, i32>(0) as u16)
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    env.eu_west().stop_immediate().unwrap();
    let port = noisy.await.unwrap().expect("the read is retried elsewhere");
    assert_ne!(port, env.port_of("eu-west"));
    for round in 0..20 {
        for client in &clients {
            let port = server_port(client, "").await;
            assert_ne!(port, env.port_of("eu-west"), "round {round}");
        }
    }
    // It is marked down by the monitor as well.
    let down = common::eventually(Duration::from_secs(10), || async {
        !env.shared.regions().picture().replicas[0].up
    })
    .await;
    assert!(down);
    // Back up: it serves again once the monitor sees it healthy and the ban is over.
    env.eu_west().restart().unwrap();
    env.shared.regions().unban(0);
    let back = common::eventually(Duration::from_secs(20), || async {
        server_port(&clients[0], "").await == env.port_of("eu-west")
    })
    .await;
    assert!(back, "the replica never came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_waited_for_a_connection_past_the_budget_is_routed_again() {
    // Found by the soak test: a read was admitted for eu-west while it was within the budget, then waited for a
    // server connection (here: all four of its pool's are held) while eu-west's replay stood still, and ran
    // there on data older than the budget.
    let env = start("max_lag: 1s").await;
    let setup = env.client().await;
    setup
        .batch_execute("CREATE TABLE waited (id int)")
        .await
        .unwrap();
    // A write makes a session read its writes; the holders and the reader are fresh sessions.
    let holders: Vec<Client> = futures_util::future::join_all((0..4).map(|_| env.client())).await;
    for holder in &holders {
        holder.batch_execute("BEGIN READ ONLY").await.unwrap();
        assert_eq!(server_port(holder, "").await, env.port_of("eu-west"));
    }
    env.eu_west().pause_replay().unwrap();
    env.topology
        .primary
        .cluster
        .psql("app", "INSERT INTO waited VALUES (1)")
        .unwrap();
    let reader = env.client().await;
    // One exchange (a simple query): with the extended protocol, tokio-postgres's Parse would wait instead
    // and the Bind/Execute that follows would be routed afresh.
    let read = tokio::spawn(async move {
        let messages = reader
            .simple_query("SELECT count(*), inet_server_port() FROM waited")
            .await
            .unwrap();
        let row = messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .expect("a row");
        let field = |i: usize| row.get(i).unwrap().parse::<i64>().unwrap();
        (field(0), field(1) as u16)
    });
    let eu_west_relay = env.topology.regions[0].replicas[0].addr().port();
    let waiting = common::eventually(Duration::from_secs(5), || async {
        env.shared
            .pools()
            .iter()
            .any(|p| p.key.server.port == eu_west_relay && p.waiting() == 1)
    })
    .await;
    assert!(waiting, "the read never waited for an eu-west connection");
    // The scenario itself: the wait outlasts the budget.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for holder in &holders {
        holder.batch_execute("COMMIT").await.unwrap();
    }
    let (count, port) = read.await.unwrap();
    assert_ne!(
        port,
        env.port_of("eu-west"),
        "the read ran on stale eu-west"
    );
    assert_eq!(count, 1);
    env.eu_west().resume_replay().unwrap();
}

/// The primary's connection string for the app database (for checks that bypass the gateway).
impl Env {
    async fn direct_primary(&self) -> Client {
        common::connect(&format!(
            "host=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=app",
            self.primary_port()
        ))
        .await
    }

    /// Waits until the eu-west replica shows what the primary committed: `sql` returns `expected`.
    async fn wait_eu_west_shows(&self, sql: &str, expected: i64) {
        let replica = common::connect(&format!(
            "host=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=app",
            self.port_of("eu-west")
        ))
        .await;
        let shown = common::eventually(Duration::from_secs(20), || async {
            replica
                .query_one(sql, &[])
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == expected)
        })
        .await;
        assert!(shown, "eu-west never showed {sql} = {expected}");
    }

    fn transactions(&self, start: &str, outcome: &str) -> u64 {
        regiongate::metrics::METRICS
            .transactions_routed
            .with_label_values(&[start, outcome])
            .get()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_that_read_run_on_the_replica_and_move_to_the_primary_at_their_first_write() {
    let env = start("max_lag: 5s").await;
    let direct = env.direct_primary().await;
    direct
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);
             INSERT INTO accounts VALUES (1, 100), (2, 100), (3, 0)",
        )
        .await
        .unwrap();
    env.wait_eu_west_shows("SELECT count(*) FROM accounts", 3)
        .await;
    let client = env.client().await;
    let replica = env.port_of("eu-west");
    // BEGIN as a simple query, as psycopg and most ORMs send it, then reads through the extended protocol;
    // and BEGIN through the extended protocol, as prepared-statement drivers send it.
    for extended_begin in [false, true] {
        let mut on_replica = 0;
        for _ in 0..20 {
            if extended_begin {
                client.execute("BEGIN", &[]).await.unwrap();
            } else {
                client.batch_execute("BEGIN").await.unwrap();
            }
            let port = server_port(&client, "").await;
            let row = client
                .query_one("SELECT balance FROM accounts WHERE id = $1", &[&1])
                .await
                .unwrap();
            assert_eq!(row.get::<_, i32>(0), 100);
            client.batch_execute("COMMIT").await.unwrap();
            on_replica += u32::from(port == replica);
        }
        assert!(
            on_replica >= 18,
            "{on_replica} of 20 read-only transactions on the replica (extended BEGIN: {extended_begin})"
        );
    }
    // Read, write, read the write: the transaction moves to the primary at its write and sees it there.
    let moved_before = env.transactions("replica", "moved");
    client.batch_execute("BEGIN").await.unwrap();
    let before: i32 = client
        .query_one("SELECT balance FROM accounts WHERE id = $1", &[&2])
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "UPDATE accounts SET balance = balance - 10 WHERE id = $1",
            &[&2],
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT balance, inet_server_port() FROM accounts WHERE id = $1",
            &[&2],
        )
        .await
        .unwrap();
    // The replica stops replaying before the commit, so that it cannot show it: the next transaction must
    // read it elsewhere.
    env.eu_west().pause_replay().unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        (row.get::<_, i32>(0), row.get::<_, i32>(1) as u16),
        (before - 10, env.primary_port())
    );
    assert!(env.transactions("replica", "moved") > moved_before);
    let committed: i32 = direct
        .query_one("SELECT balance FROM accounts WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(committed, 90);
    // The session's next transaction sees its commit (read your writes).
    client.batch_execute("BEGIN").await.unwrap();
    let seen: i32 = client
        .query_one("SELECT balance FROM accounts WHERE id = $1", &[&2])
        .await
        .unwrap()
        .get(0);
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(seen, 90);
    env.eu_west().resume_replay().unwrap();
    env.wait_eu_west_shows("SELECT balance::bigint FROM accounts WHERE id = 2", 90)
        .await;

    // SET LOCAL and a statement prepared inside the transaction are sent again, in order, and hold on the
    // primary after the move.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("SET LOCAL work_mem = '5MB'")
        .await
        .unwrap();
    let named = client
        .prepare("SELECT balance FROM accounts WHERE id = $1")
        .await
        .unwrap();
    client.query_one(&named, &[&1]).await.unwrap();
    client
        .execute("UPDATE accounts SET balance = balance WHERE id = $1", &[&1])
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT current_setting('work_mem'), inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1) as u16),
        ("5MB".to_string(), env.primary_port())
    );
    let balance: i32 = client.query_one(&named, &[&1]).await.unwrap().get(0);
    assert_eq!(balance, 100);
    client.batch_execute("COMMIT").await.unwrap();
    // An error on the replica aborts the transaction there, as on PostgreSQL: nothing moves.
    client.batch_execute("BEGIN").await.unwrap();
    let error = client.query_one("SELECT 1 / 0", &[]).await.unwrap_err();
    assert_eq!(common::sqlstate(&error), "22012");
    let error = client
        .execute("UPDATE accounts SET balance = 0 WHERE id = $1", &[&1])
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&error), "25P02");
    client.batch_execute("ROLLBACK").await.unwrap();

    // Four clients incrementing one counter with SELECT ... FOR UPDATE, then UPDATE: exact.
    let mut workers = Vec::new();
    for _ in 0..4 {
        let worker = env.client().await;
        workers.push(tokio::spawn(async move {
            for _ in 0..10 {
                worker.batch_execute("BEGIN").await.unwrap();
                let value: i32 = worker
                    .query_one(
                        "SELECT balance FROM accounts WHERE id = $1 FOR UPDATE",
                        &[&3],
                    )
                    .await
                    .unwrap()
                    .get(0);
                worker
                    .execute(
                        "UPDATE accounts SET balance = $1 WHERE id = $2",
                        &[&(value + 1), &3],
                    )
                    .await
                    .unwrap();
                worker.batch_execute("COMMIT").await.unwrap();
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let counter: i32 = direct
        .query_one("SELECT balance FROM accounts WHERE id = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(counter, 40);

    // psycopg 3 without autocommit: reads in its implicit transactions reach the replica; a transaction that
    // writes commits on the primary.
    let script = r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1])
replica = int(sys.argv[2])
on_replica = 0
for i in range(20):
    port = conn.execute("SELECT inet_server_port()").fetchone()[0]
    conn.execute("SELECT balance FROM accounts WHERE id = %s", (1,)).fetchone()
    conn.commit()
    on_replica += port == replica
# Pipeline mode: BEGIN goes in one exchange with the transaction's first statements, as JDBC sends it.
pipelined = 0
for i in range(10):
    with conn.pipeline():
        first = conn.execute("SELECT inet_server_port()")
        conn.execute("SELECT balance FROM accounts WHERE id = %s", (1,))
    pipelined += first.fetchone()[0] == replica
    conn.commit()
before = conn.execute("SELECT balance FROM accounts WHERE id = %s", (1,)).fetchone()[0]
conn.execute("UPDATE accounts SET balance = balance + 5 WHERE id = %s", (1,))
after = conn.execute("SELECT balance FROM accounts WHERE id = %s", (1,)).fetchone()[0]
conn.commit()
print(on_replica, after - before, pipelined)
"#;
    let output = tokio::task::spawn_blocking({
        let dsn = format!(
            "host=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=app",
            env.addr.port()
        );
        move || {
            std::process::Command::new("python3")
                .args(["-c", script, &dsn, &replica.to_string()])
                .output()
                .expect("python3 (./test.sh provides it, with psycopg)")
        }
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "(./test.sh installs psycopg) {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    let numbers: Vec<u32> = printed
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(numbers[0] >= 18, "psycopg: {printed}");
    assert_eq!(numbers[1], 5, "psycopg: {printed}");
    assert!(numbers[2] >= 9, "psycopg pipeline: {printed}");
    let metrics = regiongate::metrics::METRICS.render();
    assert!(
        metrics.contains("regiongate_transactions_total{outcome=\"read-only\",start=\"replica\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_a_read_the_primary_answers_differently_gets_40001_and_commits_nothing() {
    // A budget the paused replica stays within, so that the transaction starts there.
    let env = start("max_lag: 1h").await;
    let direct = env.direct_primary().await;
    direct
        .batch_execute("CREATE TABLE stock (id int PRIMARY KEY, left_over int NOT NULL); INSERT INTO stock VALUES (1, 5)")
        .await
        .unwrap();
    env.wait_eu_west_shows("SELECT count(*) FROM stock", 1)
        .await;
    env.eu_west().pause_replay().unwrap();
    direct
        .batch_execute("UPDATE stock SET left_over = 0 WHERE id = 1")
        .await
        .unwrap();
    let client = env.client().await;
    let aborted_before = env.transactions("replica", "aborted");
    client.batch_execute("BEGIN").await.unwrap();
    let seen: i32 = client
        .query_one("SELECT left_over FROM stock WHERE id = $1", &[&1])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        seen, 5,
        "the transaction should have read the paused replica"
    );
    // The decision made on stale data is refused...
    let error = client
        .execute(
            "UPDATE stock SET left_over = $1 WHERE id = $2",
            &[&(seen - 1), &1],
        )
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&error), "40001", "{error:?}");
    let message = error.as_db_error().unwrap().message().to_string();
    assert!(
        message.contains("SELECT left_over FROM stock WHERE id = $1"),
        "{message}"
    );
    // ...the transaction is aborted, as after any error...
    let error = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(common::sqlstate(&error), "25P02");
    // ...and a COMMIT commits nothing: it rolls back, as in any aborted transaction.
    let messages = client.simple_query("COMMIT").await.unwrap();
    assert!(
        matches!(
            messages.last(),
            Some(tokio_postgres::SimpleQueryMessage::CommandComplete(_))
        ),
        "{messages:?}"
    );
    let left: i32 = direct
        .query_one("SELECT left_over FROM stock WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    assert_eq!(env.transactions("replica", "aborted"), aborted_before + 1);
    // Its retry starts on the primary (the shape wrote) and decides on what is there now.
    client.batch_execute("BEGIN").await.unwrap();
    let row = client
        .query_one("SELECT left_over FROM stock WHERE id = $1", &[&1])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 0);
    client
        .execute("UPDATE stock SET left_over = $1 WHERE id = $2", &[&10, &1])
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    let left: i32 = direct
        .query_one("SELECT left_over FROM stock WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 10);
    env.eu_west().resume_replay().unwrap();
}

/// Savepoints are allowed on a standby, so a transaction that uses them (Django's nested atomic blocks,
/// psycopg's nested `transaction()`) reads on the replica, and moves at its first write like any other. A
/// rollback to a savepoint undoes what no answer shows, so a later write cannot be validated: 40001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_with_savepoints_read_on_the_replica() {
    let env = start("max_lag: 1h").await;
    let direct = env.direct_primary().await;
    direct
        .batch_execute("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL); INSERT INTO notes VALUES (1, 'a')")
        .await
        .unwrap();
    env.wait_eu_west_shows("SELECT count(*) FROM notes", 1)
        .await;
    let replica = env.port_of("eu-west");
    let client = env.client().await;
    let read_only = env.transactions("replica", "read-only");
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute("SAVEPOINT ro_1").await.unwrap();
    assert_eq!(server_port(&client, "").await, replica);
    client
        .batch_execute("RELEASE SAVEPOINT ro_1")
        .await
        .unwrap();
    client.batch_execute("SAVEPOINT ro_2").await.unwrap();
    assert_eq!(server_port(&client, "").await, replica);
    client.batch_execute("COMMIT").await.unwrap();
    // (At least: tests in this file run at once, and the counters are the process's.)
    assert!(env.transactions("replica", "read-only") > read_only);

    // A write after a savepoint moves the transaction, savepoint and all.
    let moved = env.transactions("replica", "moved");
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute("SAVEPOINT mv").await.unwrap();
    let body: String = client
        .query_one("SELECT body FROM notes WHERE id = $1", &[&1])
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, "a");
    client
        .execute("UPDATE notes SET body = body || 'b' WHERE id = $1", &[&1])
        .await
        .unwrap();
    client.batch_execute("RELEASE SAVEPOINT mv").await.unwrap();
    assert_eq!(server_port(&client, "").await, env.primary_port());
    client.batch_execute("COMMIT").await.unwrap();
    assert!(env.transactions("replica", "moved") > moved);

    // A rollback to a savepoint on the replica, then a write: refused, and nothing commits.
    env.wait_eu_west_shows("SELECT count(*) FROM notes WHERE body = 'ab'", 1)
        .await;
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute("SAVEPOINT rb").await.unwrap();
    assert_eq!(server_port(&client, "").await, replica);
    client
        .batch_execute("ROLLBACK TO SAVEPOINT rb")
        .await
        .unwrap();
    let error = client
        .execute("UPDATE notes SET body = 'c' WHERE id = $1", &[&1])
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&error), "40001", "{error:?}");
    let message = error.as_db_error().unwrap().message().to_string();
    assert!(message.contains("rolled back to a savepoint"), "{message}");
    client.batch_execute("COMMIT").await.unwrap();
    let body: String = direct
        .query_one("SELECT body FROM notes WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, "ab");
}

/// A replica that dies in the middle of a transaction: the client gets an error and its session ends, as on a
/// direct connection, and no part of its transaction is run again anywhere; or, for a write that moves the
/// transaction to the primary before the gateway has seen the replica go, the move succeeds as any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_dying_mid_transaction_ends_it_with_an_error() {
    let env = start("max_lag: 1h").await;
    let direct = env.direct_primary().await;
    direct
        .batch_execute("CREATE TABLE tally (id int PRIMARY KEY, n int NOT NULL); INSERT INTO tally VALUES (1, 0)")
        .await
        .unwrap();
    env.wait_eu_west_shows("SELECT count(*) FROM tally", 1)
        .await;
    let replica = common::connect(&format!(
        "host=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=app application_name=regiongate-test",
        env.port_of("eu-west")
    ))
    .await;
    // The gateway's pooled connections to the replica (its own side connections name themselves).
    let kill_pooled = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                       WHERE usename = 'app' AND backend_type = 'client backend' \
                       AND application_name NOT LIKE 'regiongate%'";
    // The next statement a read, then a write (which would move the transaction to the primary).
    for next in [
        "SELECT n FROM tally WHERE id = 1",
        "UPDATE tally SET n = n + 1 WHERE id = 1",
    ] {
        let client = env.client().await;
        client.batch_execute("BEGIN").await.unwrap();
        let n: i32 = client
            .query_one("SELECT n FROM tally WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
        let killed: i64 = replica.query_one(kill_pooled, &[]).await.unwrap().get(0);
        assert!(killed >= 1, "the transaction's connection on the replica");
        // pg_terminate_backend only signals: wait until the backend has gone.
        let gone = common::eventually(Duration::from_secs(10), || async {
            let left: i64 = replica
                .query_one(&kill_pooled.replace("pg_terminate_backend(pid)", "*"), &[])
                .await
                .unwrap()
                .get(0);
            left == 0
        })
        .await;
        assert!(gone, "the terminated backend stayed");
        let error = match client.batch_execute(next).await {
            // The write can move the transaction before the gateway has read the replica's FATAL (a
            // transaction waiting for its client leaves its server's socket alone): its reads are replayed on
            // the primary and compared with the replica's answers, which came before the replica died, and it
            // goes on there. That is as valid as any move; it must then commit once, there.
            Ok(()) if next.starts_with("UPDATE") => {
                client
                    .batch_execute("COMMIT")
                    .await
                    .expect("the moved transaction commits on the primary");
                let n: i32 = direct
                    .query_one("SELECT n FROM tally WHERE id = 1", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, 1, "the moved write ran once");
                continue;
            }
            Ok(()) => panic!("{next}: a statement on a dead replica's connection succeeded"),
            Err(error) => error,
        };
        // The server's FATAL as the statement's answer, or, when it came before the statement (the gateway
        // read it first), as tokio-postgres reports an unsolicited FATAL on a direct connection: closed.
        let code = error.as_db_error().map(|e| e.code().code().to_string());
        assert!(
            matches!(code.as_deref(), Some("57P01" | "08006")) || error.is_closed(),
            "{next}: {error:?}"
        );
        assert!(
            client.batch_execute("COMMIT").await.is_err(),
            "{next}: the session went on after its transaction was lost"
        );
        let n: i32 = direct
            .query_one("SELECT n FROM tally WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{next}: part of the transaction ran elsewhere");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_then_write_transaction_shape_is_learned_and_moves_rarely() {
    // The primary near, so that a thousand transactions stay quick.
    let env = start_with(Duration::from_millis(1), "max_lag: 5s").await;
    let direct = env.direct_primary().await;
    direct
        .batch_execute("CREATE TABLE visits (page int PRIMARY KEY, n int NOT NULL); INSERT INTO visits VALUES (7, 0)")
        .await
        .unwrap();
    env.wait_eu_west_shows("SELECT count(*) FROM visits", 1)
        .await;
    let client = env.client().await;
    let moved_before = env.transactions("replica", "moved");
    let predicted_before = env.transactions("primary", "predicted");
    for i in 0..1000 {
        client.batch_execute("BEGIN").await.unwrap();
        let n: i32 = client
            .query_one("SELECT n FROM visits WHERE page = $1", &[&7])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, i);
        client
            .execute("UPDATE visits SET n = $1 WHERE page = $2", &[&(n + 1), &7])
            .await
            .unwrap();
        client.batch_execute("COMMIT").await.unwrap();
    }
    let moved = env.transactions("replica", "moved") - moved_before;
    let predicted = env.transactions("primary", "predicted") - predicted_before;
    assert!(moved <= 10, "{moved} of 1000 moved");
    assert!(predicted >= 990, "{predicted} of 1000 predicted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_can_be_kept_on_the_primary_by_configuration() {
    let env = start("max_lag: 5s, transactions: primary").await;
    let client = env.client().await;
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(server_port(&client, "").await, env.primary_port());
    client.batch_execute("COMMIT").await.unwrap();
    // Read-only and autocommit reads still go to the replica.
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(server_port(&client, "").await, env.port_of("eu-west"));
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(server_port(&client, "").await, env.port_of("eu-west"));
    // Serializable goes to the primary, however it is asked for: a standby refuses it, READ ONLY DEFERRABLE
    // too. Inside, the transaction is what it asked to be.
    for begin in [
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY",
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
        "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    ] {
        client.batch_execute(begin).await.unwrap();
        assert_eq!(
            server_port(&client, "").await,
            env.primary_port(),
            "{begin}"
        );
        let isolation: String = client
            .query_one("SHOW transaction_isolation", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(isolation, "serializable", "{begin}");
        client.batch_execute("COMMIT").await.unwrap();
    }
    client
        .batch_execute("SET default_transaction_isolation = serializable")
        .await
        .unwrap();
    assert_eq!(server_port(&client, "").await, env.primary_port());
    client
        .batch_execute("RESET default_transaction_isolation")
        .await
        .unwrap();
    // A reload to `validated` applies to sessions already open, at their next transaction.
    let (path, yaml) = &env.config;
    std::fs::write(
        path,
        yaml.replace("transactions: primary", "transactions: validated"),
    )
    .unwrap();
    env.shared.reload().unwrap();
    env.wait_for_monitors().await;
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(server_port(&client, "").await, env.port_of("eu-west"));
    client.batch_execute("COMMIT").await.unwrap();
}

async fn isolation_and_port(client: &Client) -> (String, u16) {
    let row = client
        .query_one(
            "SELECT current_setting('transaction_isolation'), inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    (row.get::<_, String>(0), row.get::<_, i32>(1) as u16)
}

/// A standby refuses serializable mode, READ ONLY DEFERRABLE included ("cannot use serializable mode in a hot
/// standby"): wherever the isolation comes from, a serializable transaction runs on the primary, and is
/// serializable there. Were its BEGIN sent to the replica, the BEGIN would fail there and the statements after
/// it run outside any transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_transactions_run_on_the_primary_wherever_the_isolation_comes_from() {
    let env = start("max_lag: 5s").await;
    let serializable = ("serializable".to_string(), env.primary_port());
    let client = env.client().await;
    for begin in [
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
        "START TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE, DEFERRABLE",
    ] {
        // A lone BEGIN, which the gateway answers itself and sends with the first statement.
        client.batch_execute(begin).await.unwrap();
        assert_eq!(isolation_and_port(&client).await, serializable, "{begin}");
        client.batch_execute("COMMIT").await.unwrap();
    }
    // SET TRANSACTION as the transaction's first statement.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .await
        .unwrap();
    assert_eq!(isolation_and_port(&client).await, serializable);
    client.batch_execute("COMMIT").await.unwrap();
    // A serializable BEGIN, then a SET TRANSACTION to another level: PostgreSQL takes the later level, but a
    // standby fails at the BEGIN, so the transaction runs on the primary.
    client
        .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        .await
        .unwrap();
    client
        .batch_execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .await
        .unwrap();
    assert_eq!(
        isolation_and_port(&client).await,
        ("read committed".to_string(), env.primary_port())
    );
    client.batch_execute("COMMIT").await.unwrap();
    // The session's default, from the startup options: transactions and autocommit reads alike.
    let defaulted = common::connect(&format!(
        "host=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=app \
         options='-c default_transaction_isolation=serializable'",
        env.addr.port()
    ))
    .await;
    assert_eq!(isolation_and_port(&defaulted).await, serializable);
    defaulted.batch_execute("BEGIN").await.unwrap();
    assert_eq!(isolation_and_port(&defaulted).await, serializable);
    defaulted.batch_execute("COMMIT").await.unwrap();
    // Repeatable read is served by the replica, and is what it asked for there.
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    assert_eq!(
        isolation_and_port(&client).await,
        ("repeatable read".to_string(), env.port_of("eu-west"))
    );
    client.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_effecting_functions_in_from_and_escaped_names_run_on_the_primary() {
    let env = start("max_lag: 5s").await;
    let direct = env.direct_primary().await;
    direct.batch_execute("CREATE SEQUENCE s").await.unwrap();
    env.wait_eu_west_shows("SELECT count(*) FROM pg_class WHERE relname = 's'", 1)
        .await;
    let client = env.client().await;
    // On a replica these fail ("cannot execute nextval() in a read-only transaction"), or worse, succeed
    // where nobody else looks: an advisory lock taken on a replica excludes no one.
    for sql in [
        "SELECT * FROM nextval('s')",
        "SELECT U&\"\\006Eextval\"('s')",
        "SELECT n FROM (VALUES (1)) v, LATERAL nextval('s') n",
    ] {
        client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    client
        .query_one("SELECT * FROM pg_advisory_lock(4242)", &[])
        .await
        .unwrap();
    let held: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND granted",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 1, "the advisory lock is not held on the primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_falls_back_to_the_primary_where_stale_reads_are_refused() {
    let env = start("max_lag: 1h, when_no_replica_fits: error").await;
    let client = env.client().await;
    client
        .batch_execute("CREATE TABLE ryw (id int PRIMARY KEY)")
        .await
        .unwrap();
    for (_, node) in env.topology.replicas() {
        node.cluster.pause_replay().unwrap();
    }
    client
        .execute("INSERT INTO ryw VALUES ($1)", &[&1])
        .await
        .unwrap();
    // No replica has the write: the primary, which has it, serves the read rather than a 57P03.
    let row = client
        .query_one("SELECT count(*), inet_server_port() FROM ryw", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i32>(1) as u16),
        (1, env.primary_port())
    );
    for (_, node) in env.topology.replicas() {
        node.cluster.resume_replay().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_that_ask_for_read_write_run_on_the_primary() {
    // A standby refuses "cannot set transaction read-write mode during recovery".
    let env = start("max_lag: 2s").await;
    env.client()
        .await
        .batch_execute("CREATE TABLE rw (id int)")
        .await
        .unwrap();
    let client = env.client().await;
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    client
        .batch_execute("SET TRANSACTION READ WRITE")
        .await
        .expect("PostgreSQL lets a transaction change its mode before its first query");
    client
        .batch_execute("INSERT INTO rw VALUES (1)")
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    client.batch_execute("BEGIN READ WRITE").await.unwrap();
    assert_eq!(server_port(&client, "").await, env.primary_port());
    client.batch_execute("COMMIT").await.unwrap();
    // READ WRITE then READ ONLY, in one message or two: the standby would refuse the first already.
    let reader = env.client().await;
    reader
        .batch_execute("BEGIN READ WRITE; SET TRANSACTION READ ONLY")
        .await
        .unwrap();
    assert_eq!(server_port(&reader, "").await, env.primary_port());
    reader.batch_execute("COMMIT").await.unwrap();
    reader.batch_execute("BEGIN READ WRITE").await.unwrap();
    reader
        .batch_execute("SET TRANSACTION READ ONLY")
        .await
        .unwrap();
    assert_eq!(server_port(&reader, "").await, env.primary_port());
    reader.batch_execute("COMMIT").await.unwrap();
    // A session whose default is read-write asked for nothing: its reads still go to the replica.
    let fresh = env.client().await;
    fresh
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .unwrap();
    fresh.batch_execute("BEGIN").await.unwrap();
    assert_eq!(server_port(&fresh, "").await, env.port_of("eu-west"));
    fresh.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_every_query_form_run_on_the_replica() {
    let env = start("max_lag: 5s").await;
    let direct = env.direct_primary().await;
    // A view that says where it is read; a table and a sequence for the writes.
    direct
        .batch_execute(
            "CREATE VIEW here AS SELECT inet_server_port() AS port;
             CREATE TABLE t (a int); CREATE SEQUENCE s;",
        )
        .await
        .unwrap();
    env.wait_eu_west_shows("SELECT count(*) FROM pg_class WHERE relname = 's'", 1)
        .await;
    let (replica, primary) = (env.port_of("eu-west"), env.primary_port());
    let client = env.client().await;
    let port_of = |messages: Vec<tokio_postgres::SimpleQueryMessage>| {
        messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            })
            .and_then(|port| port.parse::<u16>().ok())
    };
    client
        .batch_execute(
            "PREPARE where_read AS SELECT port FROM here;
             PREPARE where_written (int) AS INSERT INTO t VALUES ($1) RETURNING inet_server_port();",
        )
        .await
        .unwrap();
    for (sql, on) in [
        ("TABLE here", replica),
        ("SELECT 0 WHERE false UNION ALL TABLE here", replica),
        (
            "SELECT port FROM ROWS FROM (generate_series(1, 1), inet_server_port()) AS x(n, port)",
            replica,
        ),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) \
             SEARCH DEPTH FIRST BY n SET ord SELECT inet_server_port() FROM r ORDER BY ord LIMIT 1",
            replica,
        ),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) \
             CYCLE n SET looped USING path SELECT inet_server_port() FROM r LIMIT 1",
            replica,
        ),
        ("EXECUTE where_read", replica),
    ] {
        let messages = client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_eq!(port_of(messages), Some(on), "{sql}");
    }
    // COPY to the client, of a table or a query, reads.
    for (sql, on) in [
        ("COPY (TABLE here) TO STDOUT", replica),
        ("COPY (SELECT port FROM here) TO STDOUT", replica),
        (
            "COPY (SELECT inet_server_port() + 0 * nextval('s')) TO STDOUT",
            primary,
        ),
    ] {
        let stream = client.copy_out(sql).await.unwrap();
        let chunks: Vec<bytes::Bytes> = futures_util::TryStreamExt::try_collect(stream)
            .await
            .unwrap();
        let text = String::from_utf8(chunks.concat()).unwrap();
        assert_eq!(text.trim().parse::<u16>().ok(), Some(on), "{sql}");
    }
    // The writes come last: after a write, read your writes keeps the session's reads on the primary until a
    // replica has replayed it.
    for sql in [
        "EXECUTE where_written(1)",
        "SELECT port FROM ROWS FROM (inet_server_port(), nextval('s')) AS x(port, n)",
        // A name prepared again in the same query runs what it is now, not what the session knew.
        "DEALLOCATE where_read; PREPARE where_read AS INSERT INTO t VALUES (2) RETURNING inet_server_port(); \
         EXECUTE where_read",
    ] {
        let messages = client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_eq!(port_of(messages), Some(primary), "{sql}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_of_gateway_settings_and_malformed_hints_are_refused() {
    let env = start("max_lag: 5s").await;
    let client = env.client().await;
    let refused =
        |result: Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>| {
            let error = result.expect_err("accepted");
            let db = error.as_db_error().expect("a server error");
            (db.code().code().to_string(), db.message().to_string())
        };
    for value in ["'abc'", "'-1s'", "''", "5", "'1s', '2s'"] {
        let sql = format!("SET regiongate.max_lag = {value}");
        let (code, message) = refused(client.simple_query(&sql).await);
        assert_eq!(code, "22023", "{sql}: {message}");
        assert!(
            message.contains("\"regiongate.max_lag\""),
            "{sql}: {message}"
        );
    }
    let (code, message) = refused(client.simple_query("SET regiongate.maxlag = '1s'").await);
    assert_eq!(code, "42602", "{message}");
    // A good value is kept, and a bad one later leaves it as it was.
    client
        .batch_execute("SET regiongate.max_lag = '250ms'")
        .await
        .unwrap();
    refused(
        client
            .simple_query("SET LOCAL regiongate.max_lag = 'soon'")
            .await,
    );
    let shown = client
        .query_one("SHOW regiongate.max_lag", &[])
        .await
        .unwrap();
    assert_eq!(shown.get::<_, &str>(0), "250ms");
    // In a transaction the error aborts it, as any failed statement does.
    client.batch_execute("BEGIN").await.unwrap();
    refused(client.simple_query("SET regiongate.max_lag TO 'x'").await);
    let (code, _) = refused(client.simple_query("SELECT 1").await);
    assert_eq!(code, "25P02");
    client.batch_execute("ROLLBACK").await.unwrap();
    // The statements before it in the same request are rolled back with it.
    client
        .batch_execute("CREATE TABLE kept (a int)")
        .await
        .unwrap();
    refused(
        client
            .simple_query("INSERT INTO kept VALUES (1); SET regiongate.max_lag = 'x'")
            .await,
    );
    let direct = env.direct_primary().await;
    let rows: i64 = direct
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    // Hints: a misspelled one fails the statement rather than route it as if it were not there.
    for sql in [
        "/* regiongate: max_lag=abc */ SELECT 1",
        "/* regiongate: primry */ SELECT 1",
        "/* app */ /* regiongate: */ SELECT 1",
    ] {
        let (code, message) = refused(client.simple_query(sql).await);
        assert_eq!(code, "22023", "{sql}: {message}");
        assert!(message.contains("routing hint"), "{sql}: {message}");
    }
    client
        .simple_query("/* regiongate: max_lag=2s */ SELECT 1")
        .await
        .unwrap();
    // Through the extended protocol too.
    let error = client
        .query("/* regiongate: max_lag=-1 */ SELECT 1", &[])
        .await
        .expect_err("accepted");
    assert_eq!(error.code().unwrap().code(), "22023", "{error:?}");
    let error = client
        .execute("SET regiongate.max_lag = 'abc'", &[])
        .await
        .expect_err("accepted");
    assert_eq!(error.code().unwrap().code(), "22023", "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_in_the_primary_s_region_reads_there_before_crossing_regions() {
    // us-east holds the primary (1 ms away) and no replica; eu-west's replica is 1 ms away, ap-south's 40.
    for (primary_reads, on_the_primary) in [("local", true), ("never", false)] {
        let env = start_in(
            "us-east",
            Duration::from_millis(1),
            &format!("max_lag: 5s, primary_reads: {primary_reads}"),
        )
        .await;
        let client = env.client().await;
        let expected = if on_the_primary {
            env.primary_port()
        } else {
            env.port_of("eu-west")
        };
        for _ in 0..3 {
            assert_eq!(server_port(&client, "").await, expected, "{primary_reads}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_sets_regiongate_explain_is_told_where_each_statement_went() {
    let env = start("max_lag: 5s").await;
    let (client, mut connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=app",
            env.addr.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let notices = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = notices.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) =
            futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await
        {
            if let tokio_postgres::AsyncMessage::Notice(notice) = message {
                seen.lock().unwrap().push(notice.message().to_string());
            }
        }
    });
    let taken = || std::mem::take(&mut *notices.lock().unwrap());
    // Off by default: nothing.
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(taken(), Vec::<String>::new());
    let (code, _) = match client.simple_query("SET regiongate.explain = maybe").await {
        Err(e) => (common::sqlstate(&e), e.to_string()),
        Ok(_) => panic!("a bad Boolean was accepted"),
    };
    assert_eq!(code, "22023");
    client
        .batch_execute("SET regiongate.explain = on")
        .await
        .unwrap();
    taken();
    client.simple_query("SELECT 1").await.unwrap();
    // Named as the configuration, SHOW REPLICAS and the log name it (here, the link to it).
    let eu_west = env.shared.regions().replica_urls[0].to_string();
    assert_eq!(
        taken(),
        vec![format!(
            "regiongate: routed to the replica {eu_west} in eu-west: within-budget"
        )]
    );
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS explained (x int)")
        .await
        .unwrap();
    let told = taken();
    assert!(
        told.len() == 1
            && told[0].starts_with("regiongate: routed to the primary ")
            && told[0].ends_with(": write"),
        "{told:?}"
    );
    client
        .batch_execute("RESET regiongate.explain")
        .await
        .unwrap();
    taken();
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(taken(), Vec::<String>::new());
}
