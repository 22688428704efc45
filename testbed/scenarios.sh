# Chaos scenarios of the testbed, sourced by testbed/testbed (`testbed/testbed scenarios [NAME...]`).
#
# Each scenario says what the user should see, breaks something, and asserts it from what clients received:
# every read is `SELECT inet_server_port()` through a region's gateway, so the answer itself names the server
# (and so the region) that served it; errors carry their SQLSTATE. Where the gateway's own account matters,
# regiongate_routed_total on its /metrics is checked too. Each scenario puts the topology back as it found it.
# The last line is "scenarios: N passed, N failed"; the exit status is non-zero when any check failed.

passed=0
failed=0
failures=()

expect() { # DESCRIPTION COMMAND...: one assertion
  if "${@:2}"; then
    passed=$((passed + 1))
    say "  ok    $1"
  else
    failed=$((failed + 1))
    failures+=("$scenario: $1")
    say "  FAIL  $1"
  fi
}
is() { [ "$1" = "$2" ]; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a <= b) }'; }

# reads REGION N [PAUSE]: N reads through REGION's gateway in one session (each statement is routed on its
# own). Sets r_total, r_errors, r_states (SQLSTATEs seen), r_node[NAME] and r_region[REGION] (reads served),
# r_max_stale (with STALE=1: the largest age of the testbed_tick row a read saw, in seconds).
declare -A r_node r_region
reads() {
  local region=$1 n=$2 pause=${3:-0.02} sql out err
  if [ "${STALE:-0}" = 1 ]; then
    sql="SELECT inet_server_port(), round(extract(epoch FROM clock_timestamp() - t)::numeric, 3) FROM testbed_tick, pg_sleep($pause);"
  else
    sql="SELECT inet_server_port() FROM pg_sleep($pause);"
  fi
  out=$(mktemp) err=$(mktemp)
  yes "$sql" | head -n "$n" | PGCONNECT_TIMEOUT=5 psql -X -q -A -t -v VERBOSITY=verbose \
    "postgres://app:app@127.0.0.1:${gateway_port[$region]}/app" -f - >"$out" 2>"$err" || true
  r_node=() r_region=()
  r_total=0 r_max_stale=0
  local port stale
  while IFS='|' read -r port stale; do
    [ -n "$port" ] || continue
    r_total=$((r_total + 1))
    r_node[${port_node[$port]:-$port}]=$((${r_node[${port_node[$port]:-$port}]:-0} + 1))
    r_region[${port_region[$port]:-?}]=$((${r_region[${port_region[$port]:-?}]:-0} + 1))
    if [ -n "$stale" ] && ! le "$stale" "$r_max_stale"; then r_max_stale=$stale; fi
  done <"$out"
  r_errors=$((n - r_total))
  r_states=$(grep -oE '^(ERROR|FATAL): +[0-9A-Z]{5}' "$err" | awk '{ print $2 }' | sort | uniq -c | awk '{ printf "%s×%s ", $2, $1 }' || true)
  r_error_text=$(grep -m1 -E '^(ERROR|FATAL|psql)' "$err" || true)
  rm -f "$out" "$err"
}
show_reads() { # LABEL
  local k s=""
  for k in "${!r_node[@]}"; do s+="$k=${r_node[$k]} "; done
  say "  $1: $r_total/$((r_total + r_errors)) served: ${s:-none}; errors: $r_errors $r_states"
  [ "$r_errors" = 0 ] || say "    first error: ${r_error_text:0:200}"
}

# until_reads REGION NODE-or-REGION SECONDS: polls with small batches until every read lands there; prints
# how long it took (sets waited).
until_reads() {
  local region=$1 where=$2 limit=$3 t0
  t0=$(now)
  while true; do
    reads "$region" 4 0
    if [ "$r_errors" = 0 ] && { [ "${r_node[$where]:-0}" = 4 ] || [ "${r_region[$where]:-0}" = 4 ]; }; then
      waited=$(elapsed "$t0")
      return 0
    fi
    if ! le "$(elapsed "$t0")" "$limit"; then
      waited=$(elapsed "$t0")
      return 1
    fi
    sleep 0.25
  done
}

# routed REGION-OF-GATEWAY REGION: reads that gateway has sent to replicas in REGION (regiongate_routed_total).
routed() {
  http_get "${metrics_port[$1]}" /metrics | awk -v r="region=\"$2\"" '
    /^regiongate_routed_total\{/ && index($0, r) && index($0, "role=\"replica\"") { n += $NF }
    END { printf "%d", n }'
}

# write REGION: one single-row insert through REGION's gateway. Sets w_ok, w_state (SQLSTATE), w_text, w_secs.
write() {
  local t0 err
  t0=$(now)
  if err=$(gw "$1" "INSERT INTO events (customer_id, kind) VALUES (0, 'chaos')" 2>&1 >/dev/null); then
    w_ok=1 w_state= w_text=
  else
    w_ok=0
    w_state=$(grep -oE '(ERROR|FATAL): +[0-9A-Z]{5}' <<<"$err" | head -1 | awk '{ print $2 }' || true)
    w_text=$(grep -m1 -E '(ERROR|FATAL|psql)' <<<"$err" | cut -c1-160 || true)
  fi
  w_secs=$(elapsed "$t0")
}

# The last write failed, with a SQLSTATE saying the server is unreachable (08) or shutting down (57).
write_failed_clearly() { [ "$w_ok" = 0 ] && [[ $w_state =~ ^(08|57) ]]; }

# Everything back to normal: links restored, replay resumed, every node running and streaming, each gateway
# reading from its nearest region.
baseline() {
  relay_ctl reset >/dev/null
  local n name role region port upstream
  for n in "${nodes[@]}"; do
    read -r name role region port upstream <<<"$n"
    pg "$port" "SELECT 1" >/dev/null 2>&1 || start_service "$name"
  done
  wait_for 120 "the primary" primary_ready
  for n in "${nodes[@]}"; do
    read -r name role region port upstream <<<"$n"
    [ "$role" = replica ] || continue
    wait_for 60 "$name" pg "$port" "SELECT 1"
    [ "$(pg "$port" "SELECT pg_is_wal_replay_paused()")" = f ] || pg "$port" "SELECT pg_wal_replay_resume()" >/dev/null
  done
  wait_for 120 "three streaming replicas" replicas_streaming
  until_reads eu-west eu-west-1 60 || die "baseline: eu-west's reads do not come back to eu-west-1"
  until_reads us-east eu-west-1 60 || die "baseline: us-east's reads do not come back to eu-west-1"
  until_reads ap-south ap-south 60 || die "baseline: ap-south's reads do not stay in ap-south"
}

scenario_replica_kill() {
  say "Kill the eu-west replica, then start it again."
  say "Expect: eu-west's reads move to the next region (ap-south) without an error, and come back when it is up."
  reads eu-west 20
  show_reads "before"
  expect "before: every eu-west read served by eu-west-1" is "${r_node[eu-west-1]:-0}" 20
  local m0 m1
  m0=$(routed eu-west ap-south)
  kill_service eu-west-1
  reads eu-west 40
  show_reads "killed"
  expect "killed: no read failed" is "$r_errors" 0
  expect "killed: no read served by eu-west-1" is "${r_node[eu-west-1]:-0}" 0
  expect "killed: every read served in ap-south" is "${r_region[ap-south]:-0}" 40
  m1=$(routed eu-west ap-south)
  say "  gateway-eu-west regiongate_routed_total{region=ap-south,role=replica}: $m0 -> $m1"
  expect "killed: the gateway's metrics count the reads sent to ap-south" le 40 "$((m1 - m0))"
  start_service eu-west-1
  expect "restarted: reads are back on eu-west-1 within 60 s" until_reads eu-west eu-west-1 60
  say "  back on eu-west-1 ${waited} s after the start"
}

scenario_link_cut() {
  say "Cut eu-west off (the relay resets and refuses every link from or to it), then restore it."
  say "Expect: us-east's reads (nearest replica: eu-west, 40 ms) move to ap-south without an error; a write"
  say "through eu-west's gateway fails with a clear SQLSTATE (it cannot reach the primary); all comes back."
  reads us-east 20
  show_reads "before"
  expect "before: every us-east read served by eu-west-1" is "${r_node[eu-west-1]:-0}" 20
  relay_ctl cut eu-west >/dev/null
  reads us-east 40
  show_reads "cut"
  expect "cut: no us-east read failed" is "$r_errors" 0
  expect "cut: every us-east read served in ap-south" is "${r_region[ap-south]:-0}" 40
  write eu-west
  say "  write through gateway-eu-west: ${w_state:-no error} after ${w_secs} s: ${w_text}"
  expect "cut: the write through eu-west fails with a SQLSTATE of class 08 or 57" \
    write_failed_clearly
  expect "cut: the write fails within 10 s" le "$w_secs" 10
  relay_ctl restore eu-west >/dev/null
  expect "restored: us-east's reads are back on eu-west-1 within 60 s" until_reads us-east eu-west-1 60
  say "  back on eu-west-1 ${waited} s after the restore"
  local t0
  t0=$(now)
  until write eu-west; [ "$w_ok" = 1 ] || ! le "$(elapsed "$t0")" 30; do sleep 0.5; done
  expect "restored: writes through eu-west succeed again" is "$w_ok" 1
}

scenario_latency() {
  say "Add latency: us-east <-> eu-west goes from 40 ms to 250 ms one way (ap-south stays 100 ms)."
  say "Expect: once gateway-us-east has measured it, its reads move to ap-south, now the nearest; back after."
  reads us-east 10
  show_reads "before"
  expect "before: every us-east read served by eu-west-1" is "${r_node[eu-west-1]:-0}" 10
  relay_ctl delay us-east eu-west 250 >/dev/null
  expect "slow: us-east's reads move to ap-south within 30 s" until_reads us-east ap-south 30
  say "  moved ${waited} s after the delay changed"
  reads us-east 20
  show_reads "slow"
  expect "slow: every us-east read served in ap-south, none failed" is "${r_region[ap-south]:-0}" 20
  relay_ctl delay us-east eu-west 40 >/dev/null
  expect "restored: us-east's reads are back on eu-west-1 within 30 s" until_reads us-east eu-west-1 30
  say "  back ${waited} s after the delay was restored"
}

scenario_lag() {
  say "Pause WAL replay on eu-west-1 while a ticker updates a row on the primary every 100 ms."
  say "Expect: eu-west's reads leave eu-west-1 once its lag passes the 1 s budget (to ap-south); no read sees"
  say "the ticker's row older than the budget (+ one tick + 150 ms of slack); back after replay resumes."
  ticker_start
  sleep 1
  STALE=1 reads eu-west 20 0.05
  show_reads "before"
  say "  oldest row seen: ${r_max_stale} s"
  expect "before: every eu-west read served by eu-west-1" is "${r_node[eu-west-1]:-0}" 20
  pg 15433 "SELECT pg_wal_replay_pause()" >/dev/null
  local t0
  t0=$(now)
  STALE=1 reads eu-west 60 0.05
  show_reads "paused, first $(elapsed "$t0") s"
  say "  oldest row seen: ${r_max_stale} s"
  expect "paused: no read failed" is "$r_errors" 0
  expect "paused: no read saw data older than 1.25 s" le "$r_max_stale" 1.25
  expect "paused: reads left eu-west-1 (ap-south served some)" le 1 "${r_region[ap-south]:-0}"
  STALE=1 reads eu-west 20 0.05
  show_reads "paused, later"
  expect "paused, later: every read served in ap-south" is "${r_region[ap-south]:-0}" 20
  expect "paused, later: no read saw data older than 1.25 s" le "$r_max_stale" 1.25
  pg 15433 "SELECT pg_wal_replay_resume()" >/dev/null
  expect "resumed: reads are back on eu-west-1 within 30 s" until_reads eu-west eu-west-1 30
  say "  back ${waited} s after replay resumed"
  ticker_stop
}

# ticker_start: a row on the primary updated every 100 ms (testbed_tick), so that a read can say how old the data
# it saw is (STALE=1 reads); sets ticker to the background job.
ticker_start() {
  pg 15432 "CREATE TABLE IF NOT EXISTS testbed_tick (id int PRIMARY KEY, t timestamptz NOT NULL);
            INSERT INTO testbed_tick VALUES (1, clock_timestamp()) ON CONFLICT (id) DO UPDATE SET t = excluded.t" >/dev/null
  wait_for 30 "testbed_tick on eu-west-1" pg 15433 "SELECT 1 FROM testbed_tick"
  wait_for 30 "testbed_tick on ap-south-2" pg 15435 "SELECT 1 FROM testbed_tick"
  (while :; do echo "UPDATE testbed_tick SET t = clock_timestamp();"; sleep 0.1; done |
    PGPASSWORD=postgres psql -X -q -h 127.0.0.1 -p 15432 -U postgres -d app >/dev/null 2>&1) &
  ticker=$!
}
ticker_stop() {
  kill "$ticker" 2>/dev/null || true
  pkill -P "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
}

scenario_primary_down() {
  say "Kill the primary (the whole us-east region's database), keep it down 8 s, start it again."
  say "Expect: reads go on in every region without an error, from the replicas, each telling how stale it may be"
  say "once past the 1 s budget; writes fail at once with 57P03 (no primary) while it is down, and succeed again"
  say "by themselves after it is back."
  ticker_start
  sleep 1
  write us-east
  expect "before: a write succeeds" is "$w_ok" 1
  kill_service primary
  local t_kill region errors=0 stalest=0
  t_kill=$(now)
  sleep 1
  write us-east
  say "  write through gateway-us-east 1 s after the kill: ${w_state:-no error} after ${w_secs} s: ${w_text}"
  expect "down: the write through us-east fails with 57P03" is "$w_state" 57P03
  expect "down: the write is refused within 1 s" le "$w_secs" 1
  write ap-south
  expect "down: the write through ap-south fails with 57P03" is "$w_state" 57P03
  for region in eu-west ap-south us-east; do
    STALE=1 reads "$region" 20 0.05
    show_reads "down, reads through $region"
    errors=$((errors + r_errors))
    le "$r_max_stale" "$stalest" || stalest=$r_max_stale
  done
  expect "down: no read failed in any region (each through a new login)" is "$errors" 0
  say "  stalest read served during the outage: the newest tick it saw was ${stalest} s old"
  local rest
  rest=$(awk -v a="$(elapsed "$t_kill")" 'BEGIN { d = 8 - a; print (d > 0 ? d : 0) }')
  sleep "$rest"
  ticker_stop
  start_service primary
  until write us-east; [ "$w_ok" = 1 ] || ! le "$(elapsed "$t_kill")" 90; do sleep 0.2; done
  expect "restarted: writes through us-east succeed again, with no reload" is "$w_ok" 1
  say "  write downtime: $(elapsed "$t_kill") s from the kill (the primary was down 8 s of it)"
  local t0
  t0=$(now)
  until write eu-west; [ "$w_ok" = 1 ] || ! le "$(elapsed "$t0")" 60; do sleep 0.5; done
  expect "restarted: writes through eu-west succeed again within 60 s" is "$w_ok" 1
  wait_for 120 "three streaming replicas after the primary's restart" replicas_streaming
}

# stop_clean NAME: a fast shutdown (SIGINT), as an operator's switchover does, waiting until the node is down.
stop_clean() {
  if [ "$(mode)" = docker ]; then
    docker stop "rg-$1" >/dev/null
    return
  fi
  local pid i
  pid=$(cat "$state/pids/$1" 2>/dev/null) || die "$1 was not started"
  kill -INT "$pid" 2>/dev/null || true
  for i in $(seq 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  die "$1 did not stop within 30 s"
}

streaming_from() { # PORT N: N standbys stream from the node on PORT
  [ "$(pg "$1" "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'" 2>/dev/null)" = "$2" ]
}

# repoint PORT NAME UPSTREAM: a standby streams from another node from now on (primary_conninfo, reload).
repoint() {
  pg "$1" "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=$3 user=postgres password=postgres application_name=$2'" >/dev/null
  pg "$1" "SELECT pg_reload_conf()" >/dev/null
}

scenario_promote() {
  say "Kill the primary; promote eu-west-1 (pg_promote) and point the ap-south replicas at it. Then start the"
  say "old primary again on its own (a split brain), make it a standby of the new primary, and switch back."
  say "Expect: no read fails; writes get 57P03 until the promotion and succeed through every gateway right after"
  say "it, with no reload; during the split brain no write reaches the old primary (57P03 names both); the old"
  say "primary rejoins as a standby."
  ticker_start
  sleep 1
  write eu-west
  expect "before: a write succeeds" is "$w_ok" 1
  kill_service primary
  local t_kill t_promote region errors=0 stalest=0 took first_ok=""
  t_kill=$(now)
  ticker_stop
  sleep 1
  write eu-west
  expect "down: writes get 57P03" is "$w_state" 57P03
  pg 15433 "SELECT pg_promote()" >/dev/null
  t_promote=$(now)
  for region in eu-west us-east ap-south; do
    until write "$region"; [ "$w_ok" = 1 ] || ! le "$(elapsed "$t_promote")" 10; do sleep 0.05; done
    took=$(elapsed "$t_promote")
    [ -n "$first_ok" ] || first_ok=$(elapsed "$t_kill")
    say "  write through gateway-$region succeeded ${took} s after pg_promote() returned"
    expect "promoted: writes through $region succeed within 3 s of the promotion, no reload" \
      eval '[ "$w_ok" = 1 ] && le "$took" 3'
  done
  say "  write downtime: ${first_ok} s from the kill (of which the operator's promotion came 1 s after it)"
  repoint 15434 ap-south-1 17031
  repoint 15435 ap-south-2 17031
  expect "the ap-south replicas stream from eu-west-1 within 60 s" wait_for 60 "ap-south streaming from eu-west-1" streaming_from 15433 2
  for region in eu-west ap-south us-east; do
    STALE=1 reads "$region" 20 0.05
    show_reads "promoted, reads through $region"
    errors=$((errors + r_errors))
    le "$r_max_stale" "$stalest" || stalest=$r_max_stale
  done
  expect "promoted: no read failed in any region" is "$errors" 0
  say "  stalest read served: the newest tick it saw was ${stalest} s old (the ticker wrote to the old primary)"
  start_service primary
  wait_for 60 "the old primary" pg 15432 "SELECT 1"
  local before t0
  before=$(pg 15432 "SELECT count(*) FROM events")
  t0=$(now)
  until write us-east; [[ $w_text == *"split brain"* ]] || ! le "$(elapsed "$t0")" 15; do sleep 0.2; done
  say "  write through gateway-us-east: ${w_state:-no error}: ${w_text}"
  expect "split brain: writes are refused with 57P03 naming both primaries" \
    eval '[ "$w_state" = 57P03 ] && [[ $w_text == *"split brain"* ]]'
  # Each gateway sees the old primary back at its own next probe of it (retried every 2 s at most while it
  # was down); until then its writes still go to eu-west-1, the one primary it knows.
  t0=$(now)
  until write eu-west; [[ $w_text == *"split brain"* ]] || ! le "$(elapsed "$t0")" 15; do sleep 0.2; done
  expect "split brain: the write through eu-west is refused too" is "$w_state" 57P03
  expect "split brain: no write reached the old primary" is "$(pg 15432 "SELECT count(*) FROM events")" "$before"
  local data
  data=$(pg 15432 "SHOW data_directory")
  pg 15432 "COPY (SELECT 17011) TO '$(dirname "$data")/follow'" >/dev/null
  stop_clean primary
  start_service primary
  expect "the old primary rejoins as a standby of eu-west-1 within 120 s" \
    wait_for 120 "the old primary streaming from eu-west-1" streaming_from 15433 3
  t0=$(now)
  until write us-east; [ "$w_ok" = 1 ] || ! le "$(elapsed "$t0")" 15; do sleep 0.2; done
  expect "rejoined: writes succeed again" is "$w_ok" 1
  switch_back
}

# The topology as it was: eu-west-1 stops cleanly (its standbys receive all of its WAL), the old primary is
# promoted, eu-west-1 restarts as its standby and the ap-south replicas stream from it again.
switch_back() {
  local data
  data=$(pg 15433 "SHOW data_directory")
  pg 15433 "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=17020 user=postgres password=postgres application_name=eu-west-1'" >/dev/null
  pg 15433 "COPY (SELECT 1) TO '$data/standby.signal'" >/dev/null
  stop_clean eu-west-1
  pg 15432 "SELECT pg_promote()" >/dev/null
  start_service eu-west-1
  repoint 15434 ap-south-1 17030
  repoint 15435 ap-south-2 17030
}

all_scenarios=(replica-kill link-cut latency lag primary-down promote)

cmd_scenarios() {
  [ "$(mode)" != none ] || die "no testbed is up: testbed/testbed up [--local] first"
  local names=("$@") t0 total0
  [ ${#names[@]} -gt 0 ] || names=("${all_scenarios[@]}")
  total0=$(now)
  step "baseline"
  baseline
  for scenario in "${names[@]}"; do
    declare -F "scenario_${scenario//-/_}" >/dev/null || die "no scenario $scenario (${all_scenarios[*]})"
    step "scenario $scenario"
    t0=$(now)
    "scenario_${scenario//-/_}"
    baseline
    say "  ($(elapsed "$t0") s)"
  done
  say ""
  say "scenarios took $(elapsed "$total0") s"
  for f in "${failures[@]}"; do say "FAILED: $f"; done
  say "scenarios: $passed passed, $failed failed"
  [ "$failed" = 0 ]
}
