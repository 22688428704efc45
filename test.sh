#!/usr/bin/env bash
# The README's test command: installs what the tests need and is missing, saying what it installs, then runs
# every test suite (`cargo test --workspace --no-fail-fast`; arguments are passed on to cargo test).
#
# The tests start real PostgreSQL 15 servers and drive them with psql, pgbench, promtool and Python clients
# (psycopg, SQLAlchemy). Debian packages come from apt-get (as root, or through sudo); the Python packages go
# into a virtual environment under target/, made once and reused, never into the system's Python.
set -euo pipefail
cd "$(dirname "$0")"

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
missing=()
[ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
command -v psql >/dev/null || missing+=(postgresql-client-15)
command -v pgbench >/dev/null || missing+=(postgresql-contrib)
# promtool parses the /metrics output in the operations tests.
command -v promtool >/dev/null || missing+=(prometheus)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]} (apt-get)"
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

venv=target/test-python
if ! "$venv/bin/python3" -c 'import sqlalchemy, psycopg' 2>/dev/null; then
    echo "test.sh: installing sqlalchemy and psycopg into $venv (pip)"
    mkdir -p target
    python3 -m venv "$venv"
    "$venv/bin/python3" -m pip install -q --disable-pip-version-check sqlalchemy 'psycopg[binary]'
fi
# The tests run `python3`: this one has the packages.
export PATH="$PWD/$venv/bin:$PATH"

exec cargo test --workspace --no-fail-fast "$@"
