#!/usr/bin/env bash
# Insert batching: pgbench with a single-row INSERT script against PostgreSQL 15 directly, regiongate without
# batching and regiongate with batching, interleaved in one run, fsync and synchronous_commit on.
#
#   bash benches/inserts.sh
#   DURATION=10 ROUNDS=3 CLIENTS="1 4 64 256" MODES="prepared simple" bash benches/inserts.sh
#
# Prints a markdown table (TPS, mean and p99 latency, proxy CPU, and what each acknowledged row cost the
# primary: CPU of all its processes, and WAL) and writes it into benches/README.md between the inserts
# markers. Everything it starts is stopped on exit.
set -euo pipefail

DURATION=${DURATION:-10}
# Each target runs ROUNDS times per client count and mode, the targets interleaved; the table shows the run
# with the median rows/s (its other columns with it), and rows − acks summed over the rounds.
ROUNDS=${ROUNDS:-3}
CLIENT_COUNTS=${CLIENTS:-1 4 64 256}
MODES=${MODES:-prepared simple}
POOL=${POOL:-16}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
README=$ROOT/benches/README.md
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

log "building regiongate"
(cd "$ROOT" && flock /tmp/regiongate-cargo.lock cargo build --release -p regiongate)
REGIONGATE=$ROOT/target/release/regiongate

work_dir inserts

log "starting PostgreSQL 15 (fsync on)"
start_postgres on
"$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U bench -d bench -v ON_ERROR_STOP=1 -c \
    "CREATE TABLE bench_events (id bigserial PRIMARY KEY, client int NOT NULL, payload text NOT NULL,
                                created_at timestamptz NOT NULL DEFAULT now())"

# Two gateways: the same configuration, one with batching on for bench_events (its defaults otherwise).
start_regiongate() {
    local name=$1 extra=$2 port
    port=$(free_port)
    write_regiongate_yaml "$WORK/$name.yaml" "$port" "$extra"
    RUST_LOG=warn "$REGIONGATE" --config "$WORK/$name.yaml" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    wait_listening $! "$port" "$WORK/$name.log"
    PORT[$name]=$port
    PROXY_PID[$name]=$!
}
declare -A PORT=([postgres]=$PG_PORT)
declare -A PROXY_PID=()
log "starting regiongate without and with batching"
start_regiongate regiongate ""
start_regiongate regiongate-batching "batching: { tables: [bench_events] }"
TARGETS=(postgres regiongate regiongate-batching)

# The row as an application sends it: with the extended protocol every value is a parameter (the batcher
# sends such rows as COPY); with the simple protocol the values are literals in the text (a multi-row INSERT).
cat >"$WORK/insert-extended.sql" <<'EOF'
\set client random(1, 1000000)
INSERT INTO bench_events (client, payload) VALUES (:client, :payload);
EOF
cat >"$WORK/insert-simple.sql" <<'EOF'
\set client random(1, 1000000)
INSERT INTO bench_events (client, payload) VALUES (:client, 'page_view /products/42');
EOF

# The rows in the table and the primary's WAL position, tab-separated.
count_and_lsn() {
    "$PGBIN/psql" -X -q -At -F $'\t' -h 127.0.0.1 -p "$PG_PORT" -U bench -d bench -c \
        "SELECT count(*), pg_current_wal_lsn() FROM bench_events"
}

# One run; appends: clients mode target tps mean_ms p99_ms transactions proxy_cpu_ticks rows_inserted
# primary_cpu_ticks wal_bytes
run() {
    local clients=$1 mode=$2 target=$3 pid=${PROXY_PID[$target]:-} cpu_before=0 cpu_after=0
    local out=$WORK/run-$clients-$mode-$target.log prefix=$WORK/latency-$clients-$mode-$target
    local before after lsn_before lsn_after pg_before pg_after wal
    IFS=$'\t' read -r before lsn_before < <(count_and_lsn)
    # The counting backend's time reaches the postmaster's account when it has exited: before the window.
    sleep 0.3
    pg_before=$(postgres_cpu_ticks)
    if [[ -n $pid ]]; then cpu_before=$(cpu_ticks "$pid"); fi
    "$PGBIN/pgbench" -h 127.0.0.1 -p "${PORT[$target]}" -U bench -n -T "$DURATION" -c "$clients" \
        -j $((clients < 2 ? clients : 2)) -M "$mode" -f "$WORK/insert-$([[ $mode == simple ]] && echo simple || echo extended).sql" \
        -D payload='page_view /products/42' -l --log-prefix="$prefix" \
        bench >"$out" 2>&1 || { cat "$out" >&2; exit 1; }
    if [[ -n $pid ]]; then cpu_after=$(cpu_ticks "$pid"); fi
    # pgbench has ended its connections; a backend's time reaches the postmaster's account once it exits.
    sleep 0.5
    pg_after=$(postgres_cpu_ticks)
    IFS=$'\t' read -r after lsn_after < <(count_and_lsn)
    wal=$("$PGBIN/psql" -X -q -At -h 127.0.0.1 -p "$PG_PORT" -U bench -d bench -c \
        "SELECT pg_wal_lsn_diff('$lsn_after', '$lsn_before')::bigint")
    local tps mean p99 transactions
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$out")
    mean=$(sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p' "$out")
    transactions=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    # Per-transaction logs: the third field is the latency in microseconds.
    p99=$(cat "$prefix".* | awk '{ print $3 }' | sort -n |
        awk '{ v[NR] = $1 } END { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.3f", v[i] / 1000 }')
    rm -f "$prefix".*
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$clients" "$mode" "$target" "$tps" "$mean" "$p99" \
        "$transactions" $((cpu_after - cpu_before)) $((after - before)) $((pg_after - pg_before)) "$wal" \
        >>"$WORK/results"
    log "-c $clients -M $mode $target: tps $tps, p99 $p99 ms, $((after - before)) rows for $transactions acks," \
        "primary $((pg_after - pg_before)) ticks, $wal WAL bytes"
}

: >"$WORK/results"
for mode in $MODES; do
    for clients in $CLIENT_COUNTS; do
        for _ in $(seq "$ROUNDS"); do
            for target in "${TARGETS[@]}"; do
                run "$clients" "$mode" "$target"
            done
        done
    done
done

# The backquotes in the printf formats are markdown code spans, not command substitutions.
# shellcheck disable=SC2016
table() {
    echo "| pgbench | target | rows/s | vs direct | mean latency ms | p99 latency ms | proxy CPU ms / 1k rows | primary CPU µs / row | vs direct | primary WAL bytes / row | rows − acks |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    # One line per client count, mode and target: its median run, with rows − acks summed over its rounds.
    awk -F '\t' -v OFS='\t' '
        {
            k = $1 "/" $2 "/" $3
            if (!(k in count)) order[++groups] = k
            run[k, ++count[k]] = $0
            tps[k, count[k]] = $4
            lost[k] += $9 - $7
        }
        END {
            for (g = 1; g <= groups; g++) {
                k = order[g]; n = count[k]
                for (i = 1; i <= n; i++) idx[i] = i
                for (i = 2; i <= n; i++)
                    for (j = i; j > 1 && tps[k, idx[j - 1]] > tps[k, idx[j]]; j--) {
                        t = idx[j]; idx[j] = idx[j - 1]; idx[j - 1] = t
                    }
                split(run[k, idx[int((n + 1) / 2)]], f, "\t")
                f[9] = f[7] + lost[k]
                print f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11]
            }
        }' "$WORK/results" >"$WORK/medians"
    awk -F '\t' -v hz="$CLK_TCK" '
        { lines[NR] = $0; primary[NR] = $10 / hz * 1e6 / $7 }
        $3 == "postgres" { direct[$1 "/" $2] = $4; direct_cpu[$1 "/" $2] = $10 / hz * 1e6 / $7 }
        END {
            for (n = 1; n <= NR; n++) {
                split(lines[n], f, "\t")
                k = f[1] "/" f[2]
                cpu = f[3] == "postgres" ? "-" : sprintf("%.1f", f[8] / hz * 1000 / f[7] * 1000)
                printf "| `-c %s -M %s` | %s | %.0f | %.2f | %.3f | %.3f | %s | %.1f | %.2f | %.0f | %d |\n", f[1], f[2],
                    f[3], f[4], f[4] / direct[k], f[5], f[6], cpu, primary[n], primary[n] / direct_cpu[k],
                    f[11] / f[7], f[9] - f[7]
            }
        }' "$WORK/medians"
}

BLOCK=$WORK/block.md
{
    echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores, Linux $(uname -r)," \
        "PostgreSQL $("$PGBIN/postgres" --version | awk '{ print $3 }') with fsync and synchronous_commit on;" \
        "DURATION=$DURATION ROUNDS=$ROUNDS POOL=$POOL (medians over rounds); pgbench \`-n -T $DURATION -j min(clients, 2)\`, batching defaults" \
        "(max_rows 500, max_delay 2ms, connections 4)."
    echo
    table
} >"$BLOCK"
echo
cat "$BLOCK"
replace_block '<!-- inserts:begin -->' '<!-- inserts:end -->' "$BLOCK"
log "table written to $README"
