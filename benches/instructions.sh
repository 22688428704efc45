#!/usr/bin/env bash
# Instructions each proxy executes per transaction, counted by valgrind's callgrind.
#
#   bash benches/instructions.sh
#   TX=2000 WORKLOADS="S16" bash benches/instructions.sh
#
# Unlike CPU time, the count comes out the same from run to run whatever else the machine is doing, so it
# shows changes on the hot path that the CPU tables' noise (about ±5%) hides. It counts the proxy's own
# user-space instructions only: the kernel's share of its system calls (most of a proxy's CPU, and the same
# for both) is not in it, and an instruction that misses the cache or locks the bus costs more than one that
# does not. Each proxy runs under callgrind (about 50 times slower), with pgbench making TX transactions per
# client after a warm-up; the table goes into benches/README.md between the instructions markers.
set -euo pipefail

TX=${TX:-1000}
POOL=16
ALL_WORKLOADS="S16 TPCB16"
WORKLOADS=${WORKLOADS:-$ALL_WORKLOADS}
declare -A OPTIONS=([S16]="-S -M simple" [TPCB16]="-M simple")
CLIENTS=16

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
README=$ROOT/benches/README.md
PATH=$PATH:/usr/sbin

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

for workload in $WORKLOADS; do
    if [[ -z ${OPTIONS[$workload]:-} ]]; then
        echo "unknown workload $workload; choose from: $ALL_WORKLOADS" >&2
        exit 2
    fi
done

missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
find_pgbouncer

log "building regiongate"
(cd "$ROOT" && flock /tmp/regiongate-cargo.lock cargo build --release -p regiongate)
REGIONGATE=$ROOT/target/release/regiongate

work_dir instructions
# callgrind writes its files as the user it runs as.
chmod 777 "$WORK"

log "starting PostgreSQL 15"
start_postgres off
"$PGBIN/pgbench" -i -s 10 -q -h 127.0.0.1 -p "$PG_PORT" -U bench bench >"$WORK/pgbench-init.log" 2>&1

PGBOUNCER_PORT=$(free_port)
write_pgbouncer_ini "$PGBOUNCER_PORT" disable

REGIONGATE_PORT=$(free_port)
write_regiongate_yaml "$WORK/regiongate.yaml" "$REGIONGATE_PORT" "server_tls: { mode: disable }"
OFF_PORT=$(free_port)
sed "s/^listen: .*/listen: 127.0.0.1:$OFF_PORT/" "$WORK/regiongate.yaml" >"$WORK/regiongate-off.yaml"
echo "nplus1: { enabled: false }" >>"$WORK/regiongate-off.yaml"

declare -A IR
# Runs proxy $1 (listening on $2; the command after `--`) under callgrind and counts every workload.
# $3: whether it runs as the PostgreSQL OS user (PgBouncer refuses root; callgrind_control must match).
count() {
    local name=$1 port=$2 as_server=$3
    shift 4
    local as=()
    if [[ $as_server == yes ]]; then as=("${AS_SERVER_USER[@]}"); fi
    local out=$WORK/$name.callgrind dumps=0
    RUST_LOG=warn "${as[@]}" valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_listening "$pid" "$port" "$WORK/$name.log"
    for workload in $WORKLOADS; do
        # shellcheck disable=SC2086
        "$PGBIN/pgbench" -n -c $CLIENTS -j 2 -t 50 ${OPTIONS[$workload]} -h 127.0.0.1 -p "$port" -U bench bench \
            >"$WORK/$name-$workload-warmup.log" 2>&1
        "${as[@]}" callgrind_control -z "$pid" >/dev/null
        # shellcheck disable=SC2086
        if ! "$PGBIN/pgbench" -n -c $CLIENTS -j 2 -t "$TX" ${OPTIONS[$workload]} -h 127.0.0.1 -p "$port" \
            -U bench bench >"$WORK/$name-$workload.log" 2>&1; then
            echo "pgbench failed against $name:" >&2
            tail -n 5 "$WORK/$name-$workload.log" >&2
            exit 1
        fi
        "${as[@]}" callgrind_control -d "$pid" >/dev/null
        dumps=$((dumps + 1))
        local total
        total=$(sed -n 's/^summary: //p' "$out.$dumps")
        IR[$name/$workload]=$((total / (CLIENTS * TX)))
        log "$name $workload: ${IR[$name/$workload]} instructions per transaction"
    done
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

log "counting PgBouncer"
count pgbouncer "$PGBOUNCER_PORT" yes -- "$PGBOUNCER" "$WORK/pgbouncer.ini"
log "counting regiongate"
count regiongate "$REGIONGATE_PORT" no -- "$REGIONGATE" --config "$WORK/regiongate.yaml"
log "counting regiongate with N+1 detection off"
count regiongate-nplus1-off "$OFF_PORT" no -- "$REGIONGATE" --config "$WORK/regiongate-off.yaml"

BLOCK=$WORK/block.md
{
    echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC'): $PGBOUNCER_VERSION, $(valgrind --version); POOL=$POOL, $CLIENTS clients, TX=$TX transactions each (after 50 of warm-up)."
    echo
    echo "| workload | PgBouncer | regiongate | regiongate, N+1 off | regiongate vs PgBouncer |"
    echo "|---|---:|---:|---:|---:|"
    for workload in $WORKLOADS; do
        p=${IR[pgbouncer/$workload]} r=${IR[regiongate/$workload]} o=${IR[regiongate-nplus1-off/$workload]}
        ratio=$(awk -v r="$r" -v p="$p" 'BEGIN { printf "%.2f", r / p }')
        echo "| $workload \`${OPTIONS[$workload]}\` | $p | $r | $o | ${ratio}× |"
    done
} >"$BLOCK"
cat "$BLOCK"
replace_block "<!-- instructions:begin -->" "<!-- instructions:end -->" "$BLOCK"
