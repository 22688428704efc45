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

# Where each gateway sent statements (regiongate_routed_total, summed by region, role and reason).
routed() { # METRICS_PORT
  local reply
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 0
  printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
  reply=$(cat <&3)
  exec 3<&-
  awk '/^regiongate_routed_total\{/ {
         match($0, /region="[^"]*"/); r = substr($0, RSTART + 8, RLENGTH - 9)
         match($0, /role="[^"]*"/); o = substr($0, RSTART + 6, RLENGTH - 7)
         match($0, /reason="[^"]*"/); e = substr($0, RSTART + 8, RLENGTH - 9)
         print r "/" o "/" e, $NF }' <<<"$reply" | sort
}
for m in 19930 19931 19932; do routed $m >"$out/routed-before-$m"; done

pids=()
for region_port in us-east:16432 eu-west:16433 ap-south:16434; do
  region=${region_port%:*} port=${region_port#*:}
  pgbench -n -T "$duration" -c "$clients" -j 1 -r "${vars[@]}" \
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
echo
echo "== where the gateways sent statements during the run (region/role/reason: count; regiongate_routed_total)"
for rm in us-east:19930 eu-west:19931 ap-south:19932; do
  routed "${rm#*:}" >"$out/routed-after"
  echo "gateway-${rm%:*}: $(join -a 2 "$out/routed-before-${rm#*:}" "$out/routed-after" |
    awk '{ d = (NF == 3 ? $3 - $2 : $2); if (d > 0) printf "%s: %d  ", $1, d }')"
done
exit $status
