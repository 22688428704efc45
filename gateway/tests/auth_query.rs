//! Users without a list (`auth.query_user`): a user created on the server after the gateway started logs in
//! through it, checked against the SCRAM verifier the primary returns, and its server connections log in
//! with the keys its login proved.

mod common;

use common::{cluster, sqlstate, PASSWORD};
use tokio_postgres::NoTls;

/// Connects as `user` to `database`; the error's SQLSTATE and message when refused.
async fn login(
    port: u16,
    user: &str,
    password: &str,
    database: &str,
) -> Result<tokio_postgres::Client, String> {
    let config =
        format!("host=127.0.0.1 port={port} user={user} password={password} dbname={database}");
    match tokio_postgres::connect(&config, NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Ok(client)
        }
        Err(error) => Err(format!(
            "{} {}",
            sqlstate(&error),
            error
                .as_db_error()
                .map_or_else(|| error.to_string(), |e| e.message().to_string())
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_created_after_the_gateway_started_logs_in_through_auth_query() {
    let database = common::fresh_database("authq");
    let (lookup, late) = (format!("{database}_lookup"), format!("{database}_late"));
    // The recommended setup: a role that is not a superuser reads passwords through a SECURITY DEFINER
    // function owned by one.
    cluster()
        .psql(
            &database,
            &format!(
                "CREATE FUNCTION public.user_lookup(name text) RETURNS TABLE (usename name, passwd text) \
                 LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog \
                 AS $$ SELECT usename, passwd FROM pg_shadow WHERE usename = name $$;
                 REVOKE ALL ON FUNCTION public.user_lookup(text) FROM PUBLIC;
                 CREATE ROLE {lookup} LOGIN PASSWORD 'lookup-pw';
                 GRANT EXECUTE ON FUNCTION public.user_lookup(text) TO {lookup};"
            ),
        )
        .unwrap();
    let gw = common::gateway_for(
        &database,
        &format!(
            "auth: {{ method: scram-sha-256, users: [ {{ name: {database}, password: {PASSWORD} }}, \
             {{ name: {lookup}, password: lookup-pw }} ], query_user: {lookup}, \
             query: 'SELECT * FROM public.user_lookup($1)' }}\n\
             admin: {{ users: [ {database} ] }}\n\
             pool: {{ size: 4 }}\n\
             limits: {{ max_failed_logins: 3 }}\n"
        ),
    )
    .await;
    let port = gw.addr.port();
    // Created now: the gateway's configuration has never heard of it.
    cluster()
        .psql(
            &database,
            &format!("CREATE ROLE {late} LOGIN PASSWORD 'late-pw'; GRANT ALL ON SCHEMA public TO {late};"),
        )
        .unwrap();

    let client = login(port, &late, "late-pw", &database)
        .await
        .expect("a user the primary knows");
    let row = client
        .query_one("SELECT current_user::text, session_user::text", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, &str>(0), row.get::<_, &str>(1)),
        (late.as_str(), late.as_str())
    );
    // Server connections log in as the user with the keys its login proved: several at once, each a SCRAM
    // exchange of its own with the server.
    let mut holding = Vec::new();
    for _ in 0..3 {
        let c = login(port, &late, "late-pw", &database).await.unwrap();
        c.batch_execute("BEGIN; CREATE TEMP TABLE IF NOT EXISTS x (a int)")
            .await
            .unwrap();
        holding.push(c);
    }
    let direct = common::direct(&database).await;
    let backends: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = current_database()",
            &[&late],
        )
        .await
        .unwrap()
        .get(0);
    assert!(backends >= 3, "{backends} server connections of {late}");
    drop(holding);

    // A wrong password, and a user the primary does not know, fail alike.
    let wrong = login(port, &late, "nope", &database).await.unwrap_err();
    assert!(wrong.starts_with("28P01"), "{wrong}");
    let ghost = format!("{database}_ghost");
    let unknown = login(port, &ghost, "nope", &database).await.unwrap_err();
    assert!(unknown.starts_with("28P01"), "{unknown}");
    assert!(
        unknown.contains("password authentication failed"),
        "{unknown}"
    );
    // Failed lookups count as failed logins.
    login(port, &ghost, "nope", &database).await.unwrap_err();
    login(port, &ghost, "nope", &database).await.unwrap_err();
    let locked = login(port, &ghost, "nope", &database).await.unwrap_err();
    assert!(locked.starts_with("28000"), "{locked}");

    // A new password is seen once the cache is dropped: RELOAD USERS in the console.
    cluster()
        .psql(&database, &format!("ALTER ROLE {late} PASSWORD 'new-pw'"))
        .unwrap();
    let console = login(port, &database, PASSWORD, "regiongate")
        .await
        .unwrap();
    console.simple_query("RELOAD USERS").await.unwrap();
    let old = login(port, &late, "late-pw", &database).await.unwrap_err();
    assert!(old.starts_with("28P01"), "{old}");
    let renewed = login(port, &late, "new-pw", &database)
        .await
        .expect("the new password");
    // Its server logins use what the new login proved. The pool holds the three connections opened with the
    // old keys; four transactions at once need a fourth, which only the new keys can open (the server's salt
    // changed with the password).
    let mut holding = vec![renewed];
    for _ in 0..3 {
        holding.push(login(port, &late, "new-pw", &database).await.unwrap());
    }
    for c in &holding {
        c.batch_execute("BEGIN; CREATE TEMP TABLE IF NOT EXISTS y (a int)")
            .await
            .expect("a transaction on a server connection of its own");
    }
    let backends: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = current_database()",
            &[&late],
        )
        .await
        .unwrap()
        .get(0);
    assert!(backends >= 4, "{backends} server connections of {late}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_md5_user_is_looked_up_and_its_hash_logs_in_to_an_md5_server() {
    let md5_cluster = tokio::task::spawn_blocking(|| {
        let cluster = testbed::Cluster::start(&testbed::ClusterOptions {
            host_auth: testbed::HostAuth::Md5,
            ..Default::default()
        })
        .expect("starting an md5 cluster");
        cluster
            .psql(
                "postgres",
                "SET password_encryption = 'md5'; CREATE ROLE old_app LOGIN PASSWORD 'md5-pw';",
            )
            .expect("an md5 role");
        cluster
    })
    .await
    .unwrap();
    // The superuser reads pg_shadow with the default query.
    let text = format!(
        "listen: 127.0.0.1:0\nprimary: postgres://127.0.0.1:{}/postgres\n\
         auth: {{ method: md5, users: [ {{ name: postgres, password: {} }} ], query_user: postgres }}\n",
        md5_cluster.port(),
        testbed::SUPERUSER_PASSWORD
    );
    let gw = common::gateway_from(&text, "postgres").await;
    let client = login(gw.addr.port(), "old_app", "md5-pw", "postgres")
        .await
        .expect("an md5 user the primary knows");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "old_app");
    let wrong = login(gw.addr.port(), "old_app", "nope", "postgres")
        .await
        .unwrap_err();
    assert!(wrong.starts_with("28P01"), "{wrong}");
}
