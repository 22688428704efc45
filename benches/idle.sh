#!/usr/bin/env bash
# What an idle client costs each proxy: N clients log in (trust authentication, transaction pooling, POOL
# server connections) and stay connected doing nothing; the proxy's resident memory (VmRSS) is read before and
# after, and divided by N. Then pgbench runs select-only with 16 clients beside the largest idle crowd, and
# alone, to show whether holding the crowd slows active clients.
#
#   bash benches/idle.sh
#   COUNTS="1000 10000" bash benches/idle.sh
#   CLIENT_TLS=1 bash benches/idle.sh      # the clients log in over TLS (a self-signed certificate)
#
# PgBouncer is 1.25.2, built by ../shared/peers/build-pgbouncer.sh into /opt/pgbouncer-1.25.2 when it is not
# there yet (PGBOUNCER=/path/to/pgbouncer to use another). The table goes into benches/README.md between the
# idle markers.
set -euo pipefail

COUNTS=${COUNTS:-"1000 10000 50000"}
# IDLE_QUERY="SELECT 1": each client runs it once after its login, then idles (a client that did something).
IDLE_QUERY=${IDLE_QUERY:-}
CLIENT_TLS=${CLIENT_TLS:-0}
POOL=8
DURATION=${DURATION:-10}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
README=$ROOT/benches/README.md
PATH=$PATH:/usr/sbin

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

find_pgbouncer

# Both proxies and the client program hold one descriptor per client (the proxies one more per server
# connection); the limits are inherited from this shell. Counts that do not fit under the hard limit (raising
# it takes CAP_SYS_RESOURCE) are skipped, and the table says so.
hard=$(ulimit -Hn)
[[ $hard == unlimited ]] && hard=1048576
fitting=() skipped=()
for n in $COUNTS; do
    if ((n + 1000 <= hard)); then fitting+=("$n"); else skipped+=("$n"); fi
done
if [[ ${#fitting[@]} -eq 0 ]]; then
    echo "no count fits under this machine's file descriptor limit ($hard)" >&2
    exit 2
fi
COUNTS="${fitting[*]}"
largest=0
for n in $COUNTS; do
    ((n > largest)) && largest=$n
done
ulimit -n "$hard"

log "building regiongate and the idle client program"
(cd "$ROOT" && flock /tmp/regiongate-cargo.lock cargo build --release -p regiongate)
(cd "$ROOT" && flock /tmp/regiongate-cargo.lock cargo build --release -p benches --bin idle_clients)
# REGIONGATE=/path/to/regiongate measures another build (an older commit's, for a before-and-after).
REGIONGATE=${REGIONGATE:-$ROOT/target/release/regiongate}
IDLE_CLIENTS=$ROOT/target/release/idle_clients

work_dir idle
log "starting PostgreSQL 15"
start_postgres off
"$PGBIN/pgbench" -i -s 10 -q -h 127.0.0.1 -p "$PG_PORT" -U bench bench >"$WORK/pgbench-init.log" 2>&1

PGBOUNCER_PORT=$(free_port)
write_pgbouncer_ini "$PGBOUNCER_PORT" disable
# Trust for clients; PgBouncer logs in to the server with the password itself (a stored SCRAM verifier works
# only with clients' SCRAM keys to pass on).
echo '"bench" "bench"' >"$WORK/userlist.txt"
sed -i -e 's/^auth_type = .*/auth_type = trust/' -e "s/^max_client_conn = .*/max_client_conn = $((largest + 100))/" \
    "$WORK/pgbouncer.ini"
REGIONGATE_PORT=$(free_port)
TLS_YAML="" CONNECTION="plain TCP"
if [[ $CLIENT_TLS == 1 ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=127.0.0.1" \
        -keyout "$WORK/client-tls.key" -out "$WORK/client-tls.crt" 2>"$WORK/openssl.log"
    chmod 644 "$WORK/client-tls.key"
    cat >>"$WORK/pgbouncer.ini" <<EOF
client_tls_sslmode = require
client_tls_key_file = $WORK/client-tls.key
client_tls_cert_file = $WORK/client-tls.crt
EOF
    TLS_YAML="tls: { mode: require, cert: $WORK/client-tls.crt, key: $WORK/client-tls.key }"
    CONNECTION="TLS clients (rustls in regiongate, OpenSSL in PgBouncer; RSA 2048, no client certificate)"
    export IDLE_TLS=1 PGSSLMODE=require
fi
cat >"$WORK/regiongate.yaml" <<EOF
listen: 127.0.0.1:$REGIONGATE_PORT
primary: postgres://127.0.0.1:$PG_PORT/bench
pool: { mode: transaction, size: $POOL }
auth: { method: trust, users: [ { name: bench, password: bench } ] }
server_tls: { mode: disable }
limits: { max_clients: $((largest + 100)) }
$TLS_YAML
EOF

rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

# pgbench select-only, 16 clients, on port $1: transactions per second.
select_tps() {
    "$PGBIN/pgbench" -n -S -c 16 -j 2 -T "$DURATION" -h 127.0.0.1 -p "$1" -U bench bench 2>&1 |
        sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n 1 | cut -d. -f1
}

declare -A PER_CLIENT TOTAL_MB LOGIN_SECONDS TPS_ALONE TPS_CROWD
# Measures proxy $1 (pid $2, port $3) for every count.
# Starts proxy $1 (pgbouncer or regiongate); sets PROXY_PID and PROXY_PORT.
start_proxy() {
    if [[ $1 == pgbouncer ]]; then
        "${AS_SERVER_USER[@]}" "$PGBOUNCER" "$WORK/pgbouncer.ini" >"$WORK/pgbouncer.log" 2>&1 &
        PROXY_PORT=$PGBOUNCER_PORT
    else
        # The log level a user runs with: at info, each session has its span (client, user, database).
        RUST_LOG=${REGIONGATE_LOG:-info} "$REGIONGATE" --config "$WORK/regiongate.yaml" >"$WORK/regiongate.log" 2>&1 &
        PROXY_PORT=$REGIONGATE_PORT
    fi
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_listening "$PROXY_PID" "$PROXY_PORT" "$WORK/$1.log"
    # One login and query first, so that pools and caches that every client shares exist already.
    "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PROXY_PORT" -U bench -d bench -c 'SELECT 1' >/dev/null
}

stop_proxy() {
    kill "$PROXY_PID"
    wait "$PROXY_PID" 2>/dev/null || true
}

# Measures proxy $1 for every count, each in a fresh process (memory freed by an earlier crowd would be
# reused, and hide what a crowd costs).
measure() {
    local name=$1 before after line
    start_proxy "$name"
    TPS_ALONE[$name]=$(select_tps "$PROXY_PORT")
    stop_proxy
    for n in $COUNTS; do
        start_proxy "$name"
        sleep 1
        before=$(rss_kb "$PROXY_PID")
        coproc IDLE { "$IDLE_CLIENTS" "$PROXY_PORT" bench bench "$n" ${IDLE_QUERY:+"$IDLE_QUERY"}; }
        if ! read -r line <&"${IDLE[0]}"; then
            echo "the idle clients failed against $name" >&2
            exit 1
        fi
        sleep 1
        after=$(rss_kb "$PROXY_PID")
        PER_CLIENT[$name/$n]=$(((after - before) * 1024 / n))
        TOTAL_MB[$name/$n]=$(((after + 512) / 1024))
        LOGIN_SECONDS[$name/$n]=$(awk '{ print $3 }' <<<"$line")
        log "$name: $n idle clients, $((after - before)) kB more ($((PER_CLIENT[$name/$n])) bytes each), logged in in ${LOGIN_SECONDS[$name/$n]} s"
        if ((n == largest)); then
            TPS_CROWD[$name]=$(select_tps "$PROXY_PORT")
        fi
        echo >&"${IDLE[1]}"
        wait "$IDLE_PID" 2>/dev/null || true
        stop_proxy
    done
}

log "PgBouncer"
measure pgbouncer
log "regiongate"
measure regiongate

BLOCK=$WORK/block.md
{
    echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores, $PGBOUNCER_VERSION, POOL=$POOL, trust authentication, $CONNECTION; growth of the proxy's VmRSS per idle client, its whole VmRSS with them, and the time to log them all in (256 at a time)."
    echo
    echo "| idle clients | PgBouncer bytes/client | regiongate bytes/client | PgBouncer RSS MB | regiongate RSS MB | PgBouncer login s | regiongate login s |"
    echo "|---:|---:|---:|---:|---:|---:|---:|"
    for n in $COUNTS; do
        echo "| $n | ${PER_CLIENT[pgbouncer/$n]} | ${PER_CLIENT[regiongate/$n]} | ${TOTAL_MB[pgbouncer/$n]} | ${TOTAL_MB[regiongate/$n]} | ${LOGIN_SECONDS[pgbouncer/$n]} | ${LOGIN_SECONDS[regiongate/$n]} |"
    done
    echo
    if [[ ${#skipped[@]} -gt 0 ]]; then
        echo "Not run: ${skipped[*]} idle clients (the file descriptor limit here is $hard, and raising it takes CAP_SYS_RESOURCE)."
        echo
    fi
    echo "pgbench \`-S -c 16\`, $DURATION s: PgBouncer ${TPS_ALONE[pgbouncer]} tps alone, ${TPS_CROWD[pgbouncer]} beside $largest idle clients; regiongate ${TPS_ALONE[regiongate]} alone, ${TPS_CROWD[regiongate]} beside them."
} >"$BLOCK"
cat "$BLOCK"
if [[ $CLIENT_TLS == 1 ]]; then
    replace_block "<!-- idle-tls:begin -->" "<!-- idle-tls:end -->" "$BLOCK"
else
    replace_block "<!-- idle:begin -->" "<!-- idle:end -->" "$BLOCK"
fi
