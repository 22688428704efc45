# Shared by the benchmark scripts: process helpers, a throwaway PostgreSQL 15, medians, README blocks.
# Source it after setting ROOT and README; it sets PGBIN, CLK_TCK and AS_SERVER_USER, and `work_dir` makes
# WORK, whose processes (PIDS) and PostgreSQL are stopped on exit.

PGBIN=/usr/lib/postgresql/15/bin
CLK_TCK=$(getconf CLK_TCK)

log() { echo "== $*" >&2; }

# PostgreSQL and PgBouncer refuse to run as root: run them as the postgres OS user then, like the testbed.
# A command prefix rather than a function, so that a background PgBouncer's $! is PgBouncer itself (setpriv
# execs it), whose CPU time we read and which we kill.
AS_SERVER_USER=()
if [[ $EUID -eq 0 ]]; then
    AS_SERVER_USER=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi

# A loopback port nobody listens on, below the usual ephemeral range so outgoing connections cannot take it.
free_port() {
    local port
    while true; do
        port=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# Waits until PID listens on PORT; shows LOGFILE and fails if the process dies or 30 s pass.
wait_listening() {
    local pid=$1 port=$2 logfile=$3
    for _ in $(seq 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    echo "process $pid is not listening on port $port; its log:" >&2
    tail -n 30 "$logfile" >&2
    exit 1
}

# utime + stime of a process (all its threads), in clock ticks.
cpu_ticks() {
    local stat fields
    stat=$(<"/proc/$1/stat")
    # Fields after "(comm) ": state is [0], so utime (field 14) is [11] and stime (field 15) is [12].
    read -ra fields <<<"${stat##*) }"
    echo $((fields[11] + fields[12]))
}

# utime alone: what the process's own code costs, without the kernel's share of its system calls.
user_ticks() {
    local stat fields
    stat=$(<"/proc/$1/stat")
    read -ra fields <<<"${stat##*) }"
    echo "${fields[11]}"
}

# Median of the numbers on stdin.
median() {
    sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}

# Starts PostgreSQL 15 in $WORK/data on a free port (sets PG_PORT) with role and database `bench` (password
# bench). $1: the fsync setting (on|off); synchronous_commit is on either way.
start_postgres() {
    local fsync=$1
    PG_PORT=$(free_port)
    "${AS_SERVER_USER[@]}" "$PGBIN/initdb" -D "$WORK/data" -U postgres -E UTF8 --locale=C --no-sync \
        --auth-local=trust --auth-host=scram-sha-256 >"$WORK/initdb.log"
    cat >>"$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 300
shared_buffers = 128MB
fsync = $fsync
synchronous_commit = on
logging_collector = off
CONF
    if [[ ${SERVER_TLS:-0} == 1 ]]; then
        # TLS for the proxies' server connections: a self-signed certificate (they encrypt without verifying,
        # as sslmode=require does).
        openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=127.0.0.1" \
            -keyout "$WORK/data/server.key" -out "$WORK/data/server.crt" 2>"$WORK/openssl.log"
        chmod 600 "$WORK/data/server.key"
        if [[ $EUID -eq 0 ]]; then chown postgres:postgres "$WORK/data/server.key" "$WORK/data/server.crt"; fi
        echo "ssl = on" >>"$WORK/data/postgresql.conf"
    fi
    "${AS_SERVER_USER[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w -t 60 start >/dev/null
    # The superuser connects over the Unix socket (trust); bench's password is stored as SCRAM, the default.
    "$PGBIN/psql" -X -q -h "$WORK" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE bench LOGIN PASSWORD 'bench'" -c "CREATE DATABASE bench OWNER bench"
}

# CPU ticks (user + system) the PostgreSQL cluster has used so far: the postmaster, every process it runs now
# (backends, WAL writer, checkpointer, background writer…) and the ones it has reaped (their time is in its
# cutime and cstime, so backends that come and go are counted).
postgres_cpu_ticks() {
    local postmaster stat fields total=0 child children
    postmaster=$(head -n 1 "$WORK/data/postmaster.pid")
    if [[ ! -r /proc/$postmaster/task/$postmaster/children ]]; then
        echo "no /proc/$postmaster/task/$postmaster/children (kernel without CONFIG_PROC_CHILDREN?):" \
            "cannot count the server's CPU" >&2
        exit 1
    fi
    # The children first: one reaped after this reaches the postmaster's account read below, not neither.
    children=$(<"/proc/$postmaster/task/$postmaster/children")
    for child in $children; do
        if stat=$(cat "/proc/$child/stat" 2>/dev/null); then
            read -ra fields <<<"${stat##*) }"
            total=$((total + fields[11] + fields[12]))
        fi
    done
    stat=$(<"/proc/$postmaster/stat")
    read -ra fields <<<"${stat##*) }"
    # After "(comm) ": utime [11], stime [12], cutime [13], cstime [14].
    echo $((total + fields[11] + fields[12] + fields[13] + fields[14]))
}

# Stops that PostgreSQL (for an EXIT trap).
stop_postgres() {
    if [[ -f $WORK/data/postmaster.pid ]]; then
        "${AS_SERVER_USER[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
}

# Puts the file $3 between the marker lines $1 and $2 of $README.
replace_block() {
    local begin=$1 end=$2 block=$3
    if ! grep -qx "$begin" "$README" || ! grep -qx "$end" "$README"; then
        echo "markers $begin / $end missing in $README; the table is in $block" >&2
        return 1
    fi
    awk -v begin="$begin" -v end="$end" -v block="$block" '
        $0 == begin { print; while ((getline line < block) > 0) print line; skipping = 1; next }
        $0 == end { skipping = 0 }
        !skipping { print }
    ' "$README" >"$WORK/README.md"
    cat "$WORK/README.md" >"$README"
}

# Makes the scratch folder WORK (for PostgreSQL too) and stops everything in PIDS, and PostgreSQL, on exit.
# Every client below logs in as bench/bench with SCRAM, without TLS (proxies reach the server over TLS only
# with SERVER_TLS=1).
PIDS=()
work_dir() {
    WORK=$(mktemp -d "/tmp/regiongate-$1.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    if [[ $EUID -eq 0 ]]; then
        chown postgres:postgres "$WORK"
    fi
    export PGPASSWORD=bench PGSSLMODE=disable
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    stop_postgres
    rm -rf "$WORK"
}

# Sets PGBOUNCER (the binary) and PGBOUNCER_VERSION. The bar is PgBouncer 1.25.2, built by
# ../shared/peers/build-pgbouncer.sh into /opt/pgbouncer-1.25.2 when it is not there yet; Debian's 1.18 has no
# prepared statements in transaction pooling. PGBOUNCER=/path/to/pgbouncer picks another one.
find_pgbouncer() {
    PGBOUNCER=${PGBOUNCER:-/opt/pgbouncer-1.25.2/bin/pgbouncer}
    if [[ ! -x $PGBOUNCER ]]; then
        local builder=$ROOT/../shared/peers/build-pgbouncer.sh
        if [[ ! -f $builder ]]; then
            echo "no PgBouncer at $PGBOUNCER and no $builder to build 1.25.2; set PGBOUNCER" >&2
            exit 2
        fi
        log "building PgBouncer 1.25.2"
        bash "$builder" "$(dirname "$(dirname "$PGBOUNCER")")" >&2
    fi
    PGBOUNCER_VERSION=$("$PGBOUNCER" --version | head -n 1)
}

# Writes $WORK/pgbouncer.ini (and its auth file): PgBouncer on port $1 in transaction pooling mode, POOL
# server connections to the bench database, server_tls_sslmode $2, protocol-level prepared statements
# tracked (max_prepared_statements, 1.21 and later). Clients log in with SCRAM against bench's
# stored verifier, as in pg_authid: PgBouncer then checks client proofs with stored keys (as regiongate does
# with the verifier it derives once at startup) instead of running PBKDF2 for every login, and passes the
# client's keys on to the server.
write_pgbouncer_ini() {
    local port=$1 sslmode=$2 verifier
    verifier=$("$PGBIN/psql" -X -q -A -t -h "$WORK" -p "$PG_PORT" -U postgres -d postgres \
        -c "SELECT rolpassword FROM pg_authid WHERE rolname = 'bench'")
    echo "\"bench\" \"$verifier\"" >"$WORK/userlist.txt"
    cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_prepared_statements = 200
max_client_conn = 2000
log_connections = 0
log_disconnections = 0
log_stats = 0
server_tls_sslmode = $sslmode
EOF
}

# Writes regiongate's configuration to $1: listening on port $2, transaction pooling of POOL connections to
# the bench database on PG_PORT, clients logging in as bench/bench with SCRAM; $3, if given, adds lines.
write_regiongate_yaml() {
    local file=$1 port=$2 extra=${3:-}
    cat >"$file" <<EOF
listen: 127.0.0.1:$port
primary: postgres://127.0.0.1:$PG_PORT/bench
pool: { mode: transaction, size: $POOL }
auth: { method: scram-sha-256, users: [ { name: bench, password: bench } ] }
$extra
EOF
}
