#!/usr/bin/env bash
# pgbench against PostgreSQL 15 directly, PgBouncer and regiongate, interleaved in one run.
#
#   bash benches/pgbench.sh
#   POOL=16 DURATION=15 ROUNDS=2 SCALE=10 WORKLOADS="S1 S16" bash benches/pgbench.sh
#   SERVER_TLS=1 WORKLOADS="S16 S64 TPCB16" bash benches/pgbench.sh   # proxies reach the server over TLS
#
# Starts a throwaway PostgreSQL 15 cluster, both proxies in front of it, runs every workload ROUNDS times
# against each target in turn, prints a markdown table of the medians and writes it into benches/README.md
# between the pgbench markers. Everything it starts is stopped on exit.
set -euo pipefail

POOL=${POOL:-16}
DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-2}
SCALE=${SCALE:-10}
ALL_WORKLOADS="S1 S16 S64 TPCB16 CONNECT16 PREPARED16"
WORKLOADS=${WORKLOADS:-$ALL_WORKLOADS}

# Clients and pgbench options of each workload. -M simple is pgbench's default, spelled out for the table.
declare -A CLIENTS=([S1]=1 [S16]=16 [S64]=64 [TPCB16]=16 [CONNECT16]=16 [PREPARED16]=16)
declare -A OPTIONS=(
    [S1]="-S -M simple"
    [S16]="-S -M simple"
    [S64]="-S -M simple"
    [TPCB16]="-M simple"
    [CONNECT16]="-S -C -M simple"
    [PREPARED16]="-S -M prepared"
)
TARGETS=(postgres pgbouncer regiongate)
# NPLUS1_OFF=1 adds a second regiongate with N+1 detection off, to measure what detection costs.
NPLUS1_OFF=${NPLUS1_OFF:-0}
# SERVER_TLS=1: the server takes TLS and both proxies use it for their server connections (sslmode require:
# encrypted, certificate not verified); clients still connect without TLS. Its table has its own markers.
SERVER_TLS=${SERVER_TLS:-0}
SERVER_SSLMODE=disable
if [[ $SERVER_TLS == 1 ]]; then SERVER_SSLMODE=require; fi

for workload in $WORKLOADS; do
    if [[ -z ${CLIENTS[$workload]:-} ]]; then
        echo "unknown workload $workload; choose from: $ALL_WORKLOADS" >&2
        exit 2
    fi
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
README=$ROOT/benches/README.md

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# ---------------------------------------------------------------- PgBouncer and regiongate binaries

find_pgbouncer

log "building regiongate"
(cd "$ROOT" && flock /tmp/regiongate-cargo.lock cargo build --release -p regiongate)
REGIONGATE=$ROOT/target/release/regiongate

# ---------------------------------------------------------------- processes, cleaned up on exit

work_dir pgbench

# ---------------------------------------------------------------- PostgreSQL

log "starting PostgreSQL 15"
# fsync is off to keep the disk out of the numbers; synchronous_commit stays on (the default).
start_postgres off
log "pgbench -i -s $SCALE"
"$PGBIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U bench bench >"$WORK/pgbench-init.log" 2>&1

# ---------------------------------------------------------------- PgBouncer

log "starting $PGBOUNCER_VERSION"
PGBOUNCER_PORT=$(free_port)
write_pgbouncer_ini "$PGBOUNCER_PORT" "$SERVER_SSLMODE"
"${AS_SERVER_USER[@]}" "$PGBOUNCER" "$WORK/pgbouncer.ini" >"$WORK/pgbouncer.log" 2>&1 &
PGBOUNCER_PID=$!
PIDS+=("$PGBOUNCER_PID")
wait_listening "$PGBOUNCER_PID" "$PGBOUNCER_PORT" "$WORK/pgbouncer.log"

# ---------------------------------------------------------------- regiongate

log "starting regiongate"
REGIONGATE_PORT=$(free_port)
write_regiongate_yaml "$WORK/regiongate.yaml" "$REGIONGATE_PORT" "server_tls: { mode: $SERVER_SSLMODE }"
RUST_LOG=warn "$REGIONGATE" --config "$WORK/regiongate.yaml" >"$WORK/regiongate.log" 2>&1 &
REGIONGATE_PID=$!
PIDS+=("$REGIONGATE_PID")
wait_listening "$REGIONGATE_PID" "$REGIONGATE_PORT" "$WORK/regiongate.log"

declare -A PORT=([postgres]=$PG_PORT [pgbouncer]=$PGBOUNCER_PORT [regiongate]=$REGIONGATE_PORT)
declare -A PROXY_PID=([pgbouncer]=$PGBOUNCER_PID [regiongate]=$REGIONGATE_PID)

if [[ $NPLUS1_OFF == 1 ]]; then
    log "starting regiongate with N+1 detection off"
    OFF_PORT=$(free_port)
    sed "s/^listen: .*/listen: 127.0.0.1:$OFF_PORT/" "$WORK/regiongate.yaml" >"$WORK/regiongate-off.yaml"
    echo "nplus1: { enabled: false }" >>"$WORK/regiongate-off.yaml"
    RUST_LOG=warn "$REGIONGATE" --config "$WORK/regiongate-off.yaml" >"$WORK/regiongate-off.log" 2>&1 &
    REGIONGATE_OFF_PID=$!
    PIDS+=("$REGIONGATE_OFF_PID")
    wait_listening "$REGIONGATE_OFF_PID" "$OFF_PORT" "$WORK/regiongate-off.log"
    TARGETS+=(regiongate-nplus1-off)
    PORT[regiongate-nplus1-off]=$OFF_PORT
    PROXY_PID[regiongate-nplus1-off]=$REGIONGATE_OFF_PID
fi

for target in "${TARGETS[@]}"; do
    "$PGBIN/psql" -X -q -At -h 127.0.0.1 -p "${PORT[$target]}" -U bench -d bench -c 'SELECT 1' >/dev/null
done

# ---------------------------------------------------------------- runs

# One pgbench run; appends a tab-separated line to $WORK/results:
#   workload target round status tps latency_ms failed_tx transactions proxy_cpu_ticks first_error
#   proxy_user_ticks
run_pgbench() {
    local workload=$1 target=$2 round=$3
    local clients=${CLIENTS[$workload]} options cpu_before=0 cpu_after=0 pid=${PROXY_PID[$target]:-}
    read -ra options <<<"${OPTIONS[$workload]}"
    local out=$WORK/run-$workload-$target-$round.log
    local user_before=0 user_after=0
    if [[ -n $pid ]]; then cpu_before=$(cpu_ticks "$pid") user_before=$(user_ticks "$pid"); fi
    local status=ok
    "$PGBIN/pgbench" -h 127.0.0.1 -p "${PORT[$target]}" -U bench -n -T "$DURATION" \
        -c "$clients" -j $((clients < 2 ? clients : 2)) "${options[@]}" bench >"$out" 2>&1 || status=fails
    if [[ -n $pid ]]; then cpu_after=$(cpu_ticks "$pid") user_after=$(user_ticks "$pid"); fi

    local tps latency failed transactions error=
    # With -C pgbench 15 prints only the TPS including connection times, the point of that workload.
    tps=$(sed -n 's/^tps = \([0-9.]*\) (\(without initial connection\|including reconnection\) times\?)$/\1/p' \
        "$out")
    latency=$(sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p' "$out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")
    transactions=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    if [[ -z $tps || -z $transactions || $transactions -eq 0 ]]; then status=fails; fi
    if [[ $status == fails ]]; then
        error=$(grep -m 1 -iE 'error|fatal' "$out" || tail -n 1 "$out")
        error=$(tr -s ' \t' ' ' <<<"$error")
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$workload" "$target" "$round" "$status" \
        "${tps:-0}" "${latency:-0}" "${failed:-0}" "${transactions:-0}" $((cpu_after - cpu_before)) \
        "$error" $((user_after - user_before)) >>"$WORK/results"
    log "$workload $target round $round: $status ${tps:+tps $tps} $error"
}

: >"$WORK/results"
for workload in $WORKLOADS; do
    for round in $(seq "$ROUNDS"); do
        # Rotate which target goes first each round, so none always runs on the warmest (or most bloated) tables.
        for i in "${!TARGETS[@]}"; do
            run_pgbench "$workload" "${TARGETS[(i + round - 1) % ${#TARGETS[@]}]}" "$round"
        done
    done
done

# ---------------------------------------------------------------- report

# The values of column N of the results of WORKLOAD against TARGET, one a line.
results_column() {
    awk -F '\t' -v w="$1" -v t="$2" -v n="$3" '$1 == w && $2 == t { print $n }' "$WORK/results"
}

# The workload's median TPS against TARGET, or nothing if any round failed.
median_tps() {
    if results_column "$1" "$2" 4 | grep -q fails; then return; fi
    results_column "$1" "$2" 5 | median
}

# The backquotes in the printf formats are markdown code spans, not command substitutions.
# shellcheck disable=SC2016
table() {
    echo "| workload | target | TPS | mean latency ms | failed tx | proxy CPU ms / 1k tx (user) | TPS vs PgBouncer |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    local workload target tps bouncer_tps latency failed cpu user ratio error
    for workload in $WORKLOADS; do
        bouncer_tps=$(median_tps "$workload" pgbouncer)
        for target in "${TARGETS[@]}"; do
            tps=$(median_tps "$workload" "$target")
            if [[ -z $tps ]]; then
                error=$(awk -F '\t' -v w="$workload" -v t="$target" \
                    '$1 == w && $2 == t && $4 == "fails" { print $10; exit }' "$WORK/results")
                printf '| %s `-c %s %s` | %s | fails: %s | | | | |\n' "$workload" "${CLIENTS[$workload]}" \
                    "${OPTIONS[$workload]}" "$target" "${error//|/\\|}"
                continue
            fi
            latency=$(results_column "$workload" "$target" 6 | median)
            failed=$(results_column "$workload" "$target" 7 | awk '{ s += $1 } END { print s }')
            cpu=-
            if [[ -n ${PROXY_PID[$target]:-} ]]; then
                # ticks / CLK_TCK seconds per run, as ms per 1000 transactions; the median over rounds.
                cpu=$(awk -F '\t' -v w="$workload" -v t="$target" -v hz="$CLK_TCK" \
                    '$1 == w && $2 == t { print $9 / hz * 1000 / $8 * 1000 }' "$WORK/results" | median)
                user=$(awk -F '\t' -v w="$workload" -v t="$target" -v hz="$CLK_TCK" \
                    '$1 == w && $2 == t { print $11 / hz * 1000 / $8 * 1000 }' "$WORK/results" | median)
                cpu=$(printf '%.1f (%.1f)' "$cpu" "$user")
            fi
            ratio=n/a
            if [[ -n $bouncer_tps ]]; then
                ratio=$(awk -v a="$tps" -v b="$bouncer_tps" 'BEGIN { printf "%.2f", a / b }')
            fi
            printf '| %s `-c %s %s` | %s | %.0f | %.3f | %s | %s | %s |\n' "$workload" "${CLIENTS[$workload]}" \
                "${OPTIONS[$workload]}" "$target" "$tps" "$latency" "$failed" "$cpu" "$ratio"
        done
    done
}

BLOCK=$WORK/block.md
{
    echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores, Linux $(uname -r), $PGBOUNCER_VERSION," \
        "PostgreSQL $("$PGBIN/postgres" --version | awk '{ print $3 }'); POOL=$POOL DURATION=$DURATION" \
        "ROUNDS=$ROUNDS SCALE=$SCALE SERVER_TLS=$SERVER_TLS. Medians over rounds (failed tx: the sum); pgbench" \
        "\`-n -T $DURATION -j min(clients, 2)\`."
    echo
    table
} >"$BLOCK"

echo
cat "$BLOCK"

MARK=pgbench
if [[ $SERVER_TLS == 1 ]]; then MARK=pgbench-server-tls; fi
BEGIN_MARK="<!-- $MARK:begin -->"
END_MARK="<!-- $MARK:end -->"
if [[ -f $README ]] && grep -qx "$BEGIN_MARK" "$README" && grep -qx "$END_MARK" "$README"; then
    replace_block "$BEGIN_MARK" "$END_MARK" "$BLOCK"
else
    # No markers yet: add the section, to a new file (which gets a title) or after what is there.
    if [[ ! -f $README ]]; then printf '# Benchmarks\n\n' >"$README"; fi
    {
        echo "## pgbench: PostgreSQL direct vs PgBouncer vs regiongate"
        echo
        echo "pgbench against a throwaway PostgreSQL 15 (fsync off), PgBouncer and regiongate in front of it"
        echo "(both in transaction pooling mode with pool size POOL, clients authenticating with SCRAM),"
        echo "the three targets interleaved in one run. TPS excludes the initial connection time, except with"
        echo "\`-C\` (a new connection per transaction), where it includes the connections. Proxy CPU is the proxy"
        echo "process's user + system time during the run. A target that makes pgbench fail shows its first error."
        echo "Reproduce with:"
        echo
        echo '    bash benches/pgbench.sh'
        echo
        echo "$BEGIN_MARK"
        cat "$BLOCK"
        echo "$END_MARK"
    } >>"$README"
fi
log "table written to $README"
