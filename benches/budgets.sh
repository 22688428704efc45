#!/usr/bin/env bash
# The performance gate: instructions regiongate executes per transaction (valgrind's callgrind), for each
# workload in benches/budgets.toml, against its budget there. CI runs it after the end-to-end job (the
# release build is there already); it fails when a count exceeds its budget by more than 3%, and prints the
# table of budget, measured and ratio either way.
#
#   bash benches/budgets.sh
#   TX=400 WORKLOADS="S16 CONNECT" bash benches/budgets.sh
#   KEEP=/tmp/counts WORKLOADS=ROUTED16 bash benches/budgets.sh; callgrind_annotate /tmp/counts/routed.callgrind.1
#
# Counts are of the proxy's own user-space instructions, repeatable from run to run (within 0.3% here)
# whatever else the machine does, unlike CPU time; and from machine to machine, since valgrind shows every
# AVX2-capable host as the same CPU, so glibc picks the same string and memory routines. (PgBouncer is no
# yardstick: its count moved 9% between two runs here.) Lowering a budget is a one-line commit; raising one needs a reason
# in the commit message.
set -euo pipefail

TX=${TX:-1000}
POOL=16
CLIENTS=16
TOLERANCE=${TOLERANCE:-1.03}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
README=$ROOT/benches/README.md
BUDGETS=$ROOT/benches/budgets.toml
PATH=$PATH:/usr/sbin

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# Each workload: the pgbench arguments (after the connection ones), and which gateway it runs against.
declare -A ARGS=(
    [S16]="-S -M simple"
    [TPCB16]="-M simple"
    [PREPARED16]="-S -M prepared"
    [INSERT16]="-f INSERT"
    [ROUTED16]="-f ROUTED"
    [CONNECT]="-C -S -M simple"
)
declare -A GATEWAY=([S16]=plain [TPCB16]=plain [PREPARED16]=plain [INSERT16]=batching [ROUTED16]=routed [CONNECT]=plain)
declare -A BUDGET
while IFS='=' read -r name value; do
    name=${name// /} value=${value// /}
    [[ -n $name && -n $value ]] && BUDGET[$name]=$value
done < <(sed -n 's/#.*//; /^[A-Z0-9]* *= *[0-9]*$/p' "$BUDGETS")
WORKLOADS=${WORKLOADS:-"S16 TPCB16 PREPARED16 INSERT16 ROUTED16 CONNECT"}
for workload in $WORKLOADS; do
    [[ -n ${ARGS[$workload]:-} && -n ${BUDGET[$workload]:-} ]] || {
        echo "no workload $workload, or no budget for it in $BUDGETS" >&2
        exit 2
    }
done
command -v valgrind >/dev/null || {
    log "installing valgrind"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind
}

log "building regiongate (release)"
(cd "$ROOT" && flock /tmp/regiongate-cargo.lock cargo build --release -p regiongate)
REGIONGATE=$ROOT/target/release/regiongate

work_dir budgets
chmod 777 "$WORK"
start_postgres off
"$PGBIN/pgbench" -i -s 10 -q -h 127.0.0.1 -p "$PG_PORT" -U bench bench >"$WORK/pgbench-init.log" 2>&1
"$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U bench -d bench -v ON_ERROR_STOP=1 \
    -c "CREATE TABLE bench_events (id bigserial PRIMARY KEY, account int NOT NULL, delta int NOT NULL)"
# The single-row insert that batching turns into one multi-row statement per flush.
echo '\set a random(1, 100000)
INSERT INTO bench_events (account, delta) VALUES (:a, 1);' >"$WORK/INSERT"
# A read of one row by key, as an ORM's lookups are, routed to the replica; N+1 detection is on.
echo '\set a random(1, 1000000)
SELECT abalance FROM pgbench_accounts WHERE aid = :a;' >"$WORK/ROUTED"

# A streaming replica of the bench server, for the routed reads (the superuser streams over the socket).
REPLICA_PORT=$(free_port)
"${AS_SERVER_USER[@]}" "$PGBIN/pg_basebackup" -h "$WORK" -p "$PG_PORT" -U postgres -D "$WORK/replica" \
    -R -X stream -c fast >"$WORK/basebackup.log" 2>&1
mkdir -p "$WORK/replica-socket"
[[ $EUID -ne 0 ]] || chown postgres:postgres "$WORK/replica-socket"
{
    echo "port = $REPLICA_PORT"
    echo "unix_socket_directories = '$WORK/replica-socket'"
} >>"$WORK/replica/postgresql.conf"
"${AS_SERVER_USER[@]}" "$PGBIN/pg_ctl" -D "$WORK/replica" -l "$WORK/replica.log" -w -t 60 start >/dev/null
stop_replica() {
    "${AS_SERVER_USER[@]}" "$PGBIN/pg_ctl" -D "$WORK/replica" -m immediate -w stop >/dev/null 2>&1 || true
    # KEEP=DIR keeps the callgrind files, for callgrind_annotate to say where the instructions went.
    if [[ -n ${KEEP:-} ]]; then mkdir -p "$KEEP" && cp "$WORK"/*.callgrind.* "$KEEP"/ 2>/dev/null || true; fi
    cleanup
}
trap stop_replica EXIT

declare -A PORT
for gateway in plain batching routed; do
    PORT[$gateway]=$(free_port)
done
write_regiongate_yaml "$WORK/plain.yaml" "${PORT[plain]}" "server_tls: { mode: disable }"
write_regiongate_yaml "$WORK/batching.yaml" "${PORT[batching]}" "server_tls: { mode: disable }
batching: { tables: [ bench_events ] }"
write_regiongate_yaml "$WORK/routed.yaml" "${PORT[routed]}" "server_tls: { mode: disable }
regions: [ { name: local, replicas: [ 'postgres://127.0.0.1:$REPLICA_PORT/bench' ] } ]
routing: { max_lag: 10s, primary_reads: never }"

declare -A IR
# Counts workloads $3 (space-separated) against the proxy listening on port $2 whose command follows `--`,
# under one callgrind run of it; $1 names it.
count() {
    local name=$1 port=$2 workloads=$3 out=$WORK/$1.callgrind dumps=0 workload pid total
    shift 4
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >"$WORK/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_listening "$pid" "$port" "$WORK/$name.log"
    # The monitors' first measurements, so that routed reads go to the replica from the start.
    [[ $name != routed ]] || sleep 3
    for workload in $workloads; do
        local args=${ARGS[$workload]//-f INSERT/-f $WORK/INSERT}
        args=${args//-f ROUTED/-f $WORK/ROUTED}
        local tx=$TX
        [[ $workload != CONNECT ]] || tx=$((TX / 6))
        # shellcheck disable=SC2086
        "$PGBIN/pgbench" -n -c $CLIENTS -j 2 -t 50 $args -h 127.0.0.1 -p "$port" -U bench bench \
            >"$WORK/$name-$workload-warmup.log" 2>&1
        callgrind_control -z "$pid" >/dev/null
        # shellcheck disable=SC2086
        if ! "$PGBIN/pgbench" -n -c $CLIENTS -j 2 -t "$tx" $args -h 127.0.0.1 -p "$port" -U bench bench \
            >"$WORK/$name-$workload.log" 2>&1; then
            echo "pgbench failed ($name, $workload):" >&2
            tail -n 5 "$WORK/$name-$workload.log" >&2
            exit 1
        fi
        callgrind_control -d "$pid" >/dev/null
        dumps=$((dumps + 1))
        total=$(sed -n 's/^summary: //p' "$out.$dumps")
        IR[$name/$workload]=$((total / (CLIENTS * tx)))
        log "$name $workload: ${IR[$name/$workload]} instructions per transaction"
    done
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

started=$SECONDS
for gateway in plain batching routed; do
    selected=""
    for workload in $WORKLOADS; do
        [[ ${GATEWAY[$workload]} != "$gateway" ]] || selected+=" $workload"
    done
    [[ -z $selected ]] || count "$gateway" "${PORT[$gateway]}" "$selected" -- "$REGIONGATE" --config "$WORK/$gateway.yaml"
done

failed=0
printf '\n%-12s %10s %10s %7s\n' workload budget measured ratio
for workload in $WORKLOADS; do
    budget=${BUDGET[$workload]}
    measured=${IR[${GATEWAY[$workload]}/$workload]}
    ratio=$(awk -v m="$measured" -v b="$budget" 'BEGIN { printf "%.3f", m / b }')
    verdict=ok
    if awk -v r="$ratio" -v t="$TOLERANCE" 'BEGIN { exit !(r > t) }'; then
        verdict="OVER BUDGET (more than ${TOLERANCE}x)"
        failed=1
    fi
    printf '%-12s %10s %10s %7s  %s\n' "$workload" "$budget" "$measured" "$ratio" "$verdict"
done
echo "(counted in $((SECONDS - started)) s; TX=$TX per client, $CLIENTS clients; CONNECT: a new connection with SCRAM per transaction)"
if [[ $failed == 1 ]]; then
    echo "budgets.sh: instructions per transaction over budget (benches/budgets.toml): find what made the hot path longer" >&2
    exit 1
fi
