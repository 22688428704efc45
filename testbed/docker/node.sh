#!/bin/sh
# A PostgreSQL 15 node of the testbed: the entrypoint of the primary and replica containers, and what
# `testbed up --local` runs as a local process, so both modes start servers the same way.
#
#   node.sh primary NAME PORT DATADIR
#   node.sh replica NAME PORT DATADIR UPSTREAM_PORT
#
# The first start creates the data directory (initdb, or pg_basebackup from UPSTREAM_PORT, which for a
# replica in another region is the relay's link to the primary); later starts (after a kill) reuse it, and
# PostgreSQL's crash recovery does the rest. The server is exec'd, so it is the container's main process and
# SIGINT (compose's stop signal) is a fast shutdown.
set -eu
role=$1 name=$2 port=$3 data=$4
bin=${PG_BIN:-/usr/lib/postgresql/15/bin}

# PostgreSQL refuses to run as root: as root, every server command runs as the postgres user.
as_pg() {
    if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; else "$@"; fi
}

# A request to start over as a standby of another node: a file `follow` beside the data directory, holding the
# port to stream from (the old primary rejoining after a failover; the scenarios write it with COPY while the
# server runs, which works the same in a container and as a local process). The data directory is replaced by
# a fresh base backup.
follow=$(dirname "$data")/follow
if [ -s "$follow" ]; then
    upstream=$(cat "$follow")
    echo "node.sh: $name starts over as a standby of 127.0.0.1:$upstream (requested in $follow)"
    rm -rf "$data"
    rm -f "$follow"
    role=replica
    set -- replica "$name" "$port" "$data" "$upstream"
fi

if [ ! -s "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$data" "$(dirname "$data")"
    chmod 700 "$data"
    case $role in
    primary)
        pwfile=$(dirname "$data")/pwfile
        echo postgres > "$pwfile"
        [ "$(id -u)" = 0 ] && chown postgres:postgres "$pwfile"
        as_pg "$bin/initdb" -D "$data" -U postgres -E UTF8 --locale=C --no-sync \
            --auth-local=trust --auth-host=scram-sha-256 --pwfile="$pwfile" >/dev/null
        rm -f "$pwfile"
        cat >> "$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
max_connections = 300
fsync = off
full_page_writes = off
shared_buffers = 128MB
wal_level = replica
max_wal_senders = 10
wal_keep_size = 1GB
hot_standby = on
hot_standby_feedback = on
max_standby_streaming_delay = 5s
EOF
        echo "host replication all 127.0.0.1/32 scram-sha-256" >> "$data/pg_hba.conf"
        ;;
    replica)
        upstream=$5
        # The primary may still be starting (or its link not yet up): wait for it.
        i=0
        until PGPASSWORD=postgres as_pg "$bin/pg_isready" -q -h 127.0.0.1 -p "$upstream" -U postgres; do
            i=$((i + 1))
            [ $i -lt 300 ] || { echo "node.sh: no primary at 127.0.0.1:$upstream after 150 s" >&2; exit 1; }
            sleep 0.5
        done
        # -c fast: without it pg_basebackup waits for a spread checkpoint (90 s instead of under one).
        PGPASSWORD=postgres as_pg "$bin/pg_basebackup" -h 127.0.0.1 -p "$upstream" -U postgres \
            -D "$data" -R -X stream -c fast
        ;;
    *)
        echo "node.sh: role must be primary or replica, not $role" >&2
        exit 2
        ;;
    esac
fi

# Sockets in the node's own directory: local-mode nodes share one /tmp. cluster_name is also the name a
# replica's WAL receiver gives the primary, so pg_stat_replication says which replica is which (all of them
# connect from 127.0.0.1, through the relay).
set -- "$bin/postgres" -D "$data" -p "$port" -c "unix_socket_directories=$(dirname "$data")" -c "cluster_name=$name"
if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
fi
exec "$@"
