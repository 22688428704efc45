#!/usr/bin/env bash
# The testbed's load generator (`testbed/testbed load [SECONDS]`; in the container `load`, or locally):
# pgbench against every region's gateway at once, each mixing customer-page reads, checkouts, an ORM-style
# N+1 loop and dashboard queries on the views, plus one pgbench of single-row event inserts from many clients
# through the ap-south gateway. Prints each run's throughput and latency per script.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
duration=${DURATION:-30}
clients=${CLIENTS:-4}
event_clients=${EVENT_CLIENTS:-16}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
url() { echo "postgres://app:app@127.0.0.1:$1/app"; }

counts=$(psql -XAtq -F ' ' "$(url 16432)" -c "SELECT (SELECT max(id) FROM customers), (SELECT max(id) FROM products), (SELECT max(id) FROM orders)")
read -r customers products orders <<<"$counts"
vars=(-D "customers=$customers" -D "products=$products" -D "orders=$orders")
echo "load: ${duration}s; per region $clients clients (reads 60%, checkouts 10%, N+1 loops 15%, dashboards 15%);"
echo "      $event_clients clients inserting events through ap-south; data: $customers customers, $orders orders"

pids=()
for region_port in us-east:16432 eu-west:16433 ap-south:16434; do
  region=${region_port%:*} port=${region_port#*:}
  pgbench -n -T "$duration" -c "$clients" -j 1 -r "${vars[@]}" -D "region=$region" \
    -f "$here/read.sql@60" -f "$here/write.sql@10" -f "$here/nplus1.sql@15" -f "$here/dashboard.sql@15" \
    "$(url "$port")" >"$out/$region.txt" 2>&1 &
  pids+=($!)
done
pgbench -n -T "$duration" -c "$event_clients" -j 1 "${vars[@]}" -f "$here/event.sql" "$(url 16434)" >"$out/events.txt" 2>&1 &
pids+=($!)
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

for f in us-east eu-west ap-south events; do
  echo
  echo "== $f"
  grep -E '^(number of transactions actually processed|number of failed|latency average|tps =)|^SQL script|^ - weight|^ - [0-9]+ transactions' "$out/$f.txt" || cat "$out/$f.txt"
done
exit $status
