#!/usr/bin/env bash
# The compose cluster end to end, in containers (tests/run calls it; CI runs it):
#   tests/compose.sh            the end-to-end test
#   tests/compose.sh bench N    N failover runs in each address mode (fixed addresses,
#                               names, names behind a silent DNS server; PGQUORUM_BENCH_MODES
#                               picks some), medians printed
#                               (the figures of docs/benchmarks.md)
#
# The test builds the images (deploy/docker/build.sh, with the debug binary that
# tests/run has just built, stripped), brings deploy/compose up under a project name of
# its own, and then, while two clients commit numbered rows (one through HAProxy's
# read-write port, one through PgBouncer):
#   1. `docker kill`s the primary's container: another node must take the writes;
#   2. `docker start`s it again: it must rejoin as a standby;
#   3. `docker network disconnect`s the new primary (a host that vanished without a
#      word): the third node must take the writes;
#   4. connects it again: it must rejoin as a standby;
# and checks that every row a client saw committed is on the final primary. Every
# container, network and volume of the project is removed by name at the end, also on
# failure. No Docker engine reachable: the test is skipped, loudly.
#
# Environment: PGQUORUM_BINARY (the binary to put in the image; default
# target/debug/pgquorum), PGQUORUM_KEEP=1 (leave the cluster up on failure, for a look).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMPOSE_DIR=$ROOT/deploy/compose
MODE=${1:-test}

say() { printf '[compose %s] %s\n' "$(date +%T)" "$*"; }
fail() { printf '[compose %s] FAILED: %s\n' "$(date +%T)" "$*" >&2; exit 1; }
skip() {
  printf '\n%s\n' "######################################################################" >&2
  printf '### tests/compose.sh SKIPPED: %s\n' "$*" >&2
  printf '### The container test (image build, compose cluster, failovers) did NOT run.\n' >&2
  printf '%s\n\n' "######################################################################" >&2
  exit 0
}

command -v docker >/dev/null || skip "no docker client installed"
docker info >/dev/null 2>&1 || skip "no Docker engine reachable (docker info fails)"
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
else
  skip "no compose tool (docker compose or docker-compose) installed"
fi
command -v psql >/dev/null || fail "psql is not installed (Debian's postgresql-client-15)"
command -v python3 >/dev/null || fail "python3 is not installed"

WORK=$(mktemp -d /tmp/pgquorum-compose.XXXXXX)
PROJECT=pgquorum-e2e-$$
WRITERS=()
export COMPOSE_PROJECT_NAME=$PROJECT
export PGQUORUM_IMAGE=pgquorum:e2e PGQUORUM_PROXY_IMAGE=pgquorum-proxy:e2e
# Generated per run; reaches the containers through their environment only.
PGQUORUM_REPLICATION_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
PGQUORUM_APP_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
export PGQUORUM_REPLICATION_PASSWORD PGQUORUM_APP_PASSWORD PGQUORUM_APP_USER=app

# Free ports on loopback for the published HAProxy and PgBouncer ports.
read -r PGQUORUM_RW_PORT PGQUORUM_RO_PORT PGQUORUM_STATS_PORT PGQUORUM_PGBOUNCER_PORT < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)
export PGQUORUM_RW_PORT PGQUORUM_RO_PORT PGQUORUM_STATS_PORT PGQUORUM_PGBOUNCER_PORT PGQUORUM_BIND=127.0.0.1

compose() { (cd "$COMPOSE_DIR" && "${COMPOSE[@]}" "${FILES[@]}" "$@"); }
FILES=(-f docker-compose.yml)

# Removes everything of the project, by its compose label, whatever state it is in.
teardown() {
  local rc=$?
  for p in "${WRITERS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "$rc" != 0 ] && [ -n "${PGQUORUM_KEEP:-}" ]; then
    say "PGQUORUM_KEEP set: leaving project $PROJECT up (remove: docker-compose -p $PROJECT down -v)"
    return
  fi
  if [ "$rc" != 0 ]; then
    say "logs of the failed run:"
    for c in $(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"); do
      printf -- '--- %s\n' "$(docker inspect -f '{{.Name}}' "$c")"
      docker logs --tail 40 "$c" 2>&1 | sed 's/^/    /'
    done
  fi
  compose down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
  local ids
  ids=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
  [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
  ids=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
  [ -z "$ids" ] || docker network rm $ids >/dev/null 2>&1 || true
  ids=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
  [ -z "$ids" ] || docker volume rm -f $ids >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap teardown EXIT
trap 'exit 130' INT TERM

container() { docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1"; }
network() { docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.network=pgquorum"; }

# One line per node: NAME REPORTED GOAL HEALTH, from the monitor group.
state() {
  local m
  for m in monitor1 monitor2 monitor3; do
    # With the member's own PGQUORUM_SECURITY: the client speaks as the members do.
    docker exec "$(container $m)" sh -c 'exec pgquorum show state $PGQUORUM_SECURITY --json \
      --monitor monitor1:7000,monitor2:7000,monitor3:7000' 2>/dev/null |
      python3 -c 'import json,sys
for n in json.load(sys.stdin)["nodes"]:
    print(n["name"], n["reported_state"], n["goal_state"], n["health"])' 2>/dev/null && return 0
  done
  return 1
}

# The node whose reported and goal state are primary, with both others secondary.
settled_primary() {
  state | python3 -c 'import sys
rows = [l.split() for l in sys.stdin if l.strip()]
p = [r[0] for r in rows if r[1] == r[2] == "primary"]
s = [r[0] for r in rows if r[1] == r[2] == "secondary" and r[3] == "healthy"]
if len(rows) == 3 and len(p) == 1 and len(s) == 2: print(p[0])
else: sys.exit(1)'
}

wait_until() { # SECONDS WHAT COMMAND...
  local limit=$1 what=$2 deadline=$(( $(date +%s) + $1 ))
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { state >&2 || true; fail "$what: not within $limit s"; }
    sleep 0.5
  done
}

rw_uri="host=127.0.0.1 port=$PGQUORUM_RW_PORT user=app dbname=app connect_timeout=2"
bouncer_uri="host=127.0.0.1 port=$PGQUORUM_PGBOUNCER_PORT user=app dbname=app connect_timeout=2"
export PGPASSWORD=$PGQUORUM_APP_PASSWORD

# Commits rows FIRST, FIRST+1, ... one transaction each; logs "EPOCH ok N" for each
# acknowledged commit (psql exited 0), "EPOCH fail N" otherwise. A commit that hangs
# is abandoned, unacknowledged, after 10 s.
writer() { # URI FIRST LOG
  local uri=$1 i=$2 log=$3
  while :; do
    if timeout -s KILL 10 psql "$uri" -qAtX -c "insert into rows(id) values ($i)" >/dev/null 2>&1; then
      echo "$(date +%s.%N) ok $i"
    else
      echo "$(date +%s.%N) fail $i"
    fi
    i=$((i + 1))
  done >> "$log"
}

acked() { awk '$2 == "ok" {print $3}' "$@"; }
# The write unavailability after a fault at EPOCH, in LOG: the longest time without an
# acknowledged commit, counted from the fault on (through PgBouncer a client's commit
# waits for the new primary instead of failing, so failures alone do not show it).
recovery_after() { # EPOCH LOG
  awk -v k="$1" '$2 != "ok" {next}
    $1 > k { from = (last > k ? last : k); if ($1 - from > gap) gap = $1 - from }
    {last = $1}
    END {printf "%.2f\n", gap}' "$2"
}
# Waits until LOG has N more acknowledged commits than now.
wait_commits() { # LOG N WHAT
  local want=$(( $(acked "$1" | wc -l) + $2 ))
  wait_until 60 "$3" bash -c "[ \$(awk '\$2 == \"ok\"' '$1' | wc -l) -ge $want ]"
}

build_images() {
  local bin=${PGQUORUM_BINARY:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/pgquorum}
  [ -x "$bin" ] || fail "no pgquorum binary at $bin (cargo build -p pgquorum first)"
  # The debug build, which tests/run has just made: no release build in CI's time
  # (build.sh strips it: 190 MB with its debug information, 30 MB without).
  PGQUORUM_BINARY=$bin "$ROOT/deploy/docker/build.sh" | sed 's/^/    /'
  [ "${PIPESTATUS[0]}" = 0 ] || fail "deploy/docker/build.sh failed"
}

# Brings the cluster up; prints the seconds from `up` to ready: a primary with two
# secondaries, and a commit through HAProxy acknowledged.
up() {
  local t0 t1
  t0=$(date +%s.%N)
  compose up -d >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "compose up"; }
  wait_until 120 "a primary with two secondaries" settled_primary
  "$COMPOSE_DIR/create-role.sh" app >/dev/null || fail "creating the application role"
  wait_until 30 "a table through HAProxy" psql "$rw_uri" -qAtX -c "create table if not exists rows(id bigint primary key)"
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.1f}')"
}

# The promotion's duration (ms), from the promoted keeper's log.
promotion_ms() { # SERVICE
  docker logs "$(container "$1")" 2>&1 | grep 'from=prepare_promotion state=wait_primary' | tail -1 | sed -E 's/.* ms=([0-9]+).*/\1/'
}

run_test() {
  build_images
  say "compose up (project $PROJECT)"
  local ready
  ready=$(up)
  say "ready in $ready s: primary $(settled_primary)"

  writer "$rw_uri" 1 "$WORK/haproxy.log" & WRITERS+=($!)
  writer "$bouncer_uri" 1000000 "$WORK/pgbouncer.log" & WRITERS+=($!)
  wait_commits "$WORK/haproxy.log" 20 "commits through HAProxy"
  wait_commits "$WORK/pgbouncer.log" 20 "commits through PgBouncer"

  local first second third t
  first=$(settled_primary)
  t=$(date +%s.%N)
  docker kill "$(container "$first")" >/dev/null
  say "killed $first's container"
  wait_commits "$WORK/haproxy.log" 20 "commits through HAProxy after killing $first"
  wait_commits "$WORK/pgbouncer.log" 20 "commits through PgBouncer after killing $first"
  say "writes back after $(recovery_after "$t" "$WORK/haproxy.log") s (HAProxy), $(recovery_after "$t" "$WORK/pgbouncer.log") s (PgBouncer)"

  docker start "$(container "$first")" >/dev/null
  wait_until 120 "$first to rejoin as a secondary after docker start" settled_primary
  second=$(settled_primary)
  [ "$second" != "$first" ] || fail "$first is primary again after its restart"
  say "$first rejoined as a secondary; primary $second"

  t=$(date +%s.%N)
  docker network disconnect "$(network)" "$(container "$second")"
  say "disconnected $second's container from the network"
  wait_commits "$WORK/haproxy.log" 20 "commits through HAProxy after $second vanished"
  wait_commits "$WORK/pgbouncer.log" 20 "commits through PgBouncer after $second vanished"
  say "writes back after $(recovery_after "$t" "$WORK/haproxy.log") s (HAProxy), $(recovery_after "$t" "$WORK/pgbouncer.log") s (PgBouncer)"

  docker network connect --alias "$second" "$(network)" "$(container "$second")"
  wait_until 120 "$second to rejoin as a secondary after reconnecting" settled_primary
  third=$(settled_primary)
  [ "$third" != "$second" ] || fail "$second is primary again"
  say "$second rejoined as a secondary; primary $third"

  for p in "${WRITERS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait "${WRITERS[@]}" 2>/dev/null || true
  WRITERS=()

  # Every acknowledged row, from either client, is on the final primary.
  local have missing n
  have=$WORK/have
  psql "$rw_uri" -qAtX -c "select id from rows order by id" > "$have" || fail "reading the rows back"
  acked "$WORK/haproxy.log" "$WORK/pgbouncer.log" | sort -n > "$WORK/acked"
  n=$(wc -l < "$WORK/acked")
  [ "$n" -ge 80 ] || fail "only $n acknowledged commits: the clients did not work"
  missing=$(comm -23 <(sort "$WORK/acked") <(sort "$have") | head -5)
  [ -z "$missing" ] || fail "acknowledged rows missing on the final primary $third: $missing"
  say "all $n acknowledged rows are on the final primary $third ($(wc -l < "$have") rows there)"
  say "PASSED"
}

run_bench() {
  # The address modes dial members by fixed IPs the certificates do not name: the
  # benchmark measures failover, so it runs without TLS (docs/benchmarks.md says so).
  export PGQUORUM_SECURITY=--insecure
  local runs=$1
  build_images
  docker image inspect -f '{{.Size}}' "$PGQUORUM_IMAGE" | awk '{printf "image size: %d MB\n", $1 / 1000000}'
  # A subnet of the benchmark's own for fixed addresses (and the silent DNS server).
  export PGQUORUM_SUBNET=${PGQUORUM_SUBNET:-172.30.231}
  local mode i
  for mode in ${PGQUORUM_BENCH_MODES:-fixed dns silent-dns}; do
    for i in $(seq 1 "$runs"); do
      FILES=(-f docker-compose.yml -f ../../tests/compose/subnet.yml)
      unset PGQUORUM_MONITOR1 PGQUORUM_MONITOR2 PGQUORUM_MONITOR3 PGQUORUM_NODE1 PGQUORUM_NODE2 PGQUORUM_NODE3
      case $mode in
        fixed)
          FILES+=(-f ../../tests/compose/fixed-addresses.yml)
          export PGQUORUM_MONITOR1=$PGQUORUM_SUBNET.11 PGQUORUM_MONITOR2=$PGQUORUM_SUBNET.12 PGQUORUM_MONITOR3=$PGQUORUM_SUBNET.13
          export PGQUORUM_NODE1=$PGQUORUM_SUBNET.21 PGQUORUM_NODE2=$PGQUORUM_SUBNET.22 PGQUORUM_NODE3=$PGQUORUM_SUBNET.23 ;;
        silent-dns) FILES+=(-f ../../tests/compose/silent-dns.yml) ;;
      esac
      local ready first second t kill_s kill_p dis_s dis_p
      ready=$(up)
      : > "$WORK/w.log"
      writer "$rw_uri" $((i * 1000000)) "$WORK/w.log" & WRITERS=($!)
      wait_commits "$WORK/w.log" 10 "commits"
      first=$(settled_primary)
      t=$(date +%s.%N); docker kill "$(container "$first")" >/dev/null
      wait_commits "$WORK/w.log" 10 "commits after the kill"
      kill_s=$(recovery_after "$t" "$WORK/w.log"); kill_p=$(promotion_ms "$(current_primary)")
      docker start "$(container "$first")" >/dev/null
      wait_until 120 "rejoin" settled_primary
      second=$(settled_primary)
      t=$(date +%s.%N); docker network disconnect "$(network)" "$(container "$second")"
      wait_commits "$WORK/w.log" 10 "commits after the disconnect"
      dis_s=$(recovery_after "$t" "$WORK/w.log"); dis_p=$(promotion_ms "$(current_primary)")
      kill "${WRITERS[@]}" 2>/dev/null || true; wait "${WRITERS[@]}" 2>/dev/null || true; WRITERS=()
      echo "$mode ready_s=$ready kill_s=${kill_s:-0} kill_promotion_ms=${kill_p:-0} disconnect_s=${dis_s:-0} disconnect_promotion_ms=${dis_p:-0}" | tee -a "$WORK/bench"
      compose down -v --remove-orphans -t 5 >/dev/null 2>&1
    done
  done
  python3 - "$WORK/bench" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    mode, *kv = line.split()
    for k, v in (x.split("=") for x in kv):
        rows.setdefault(mode, {}).setdefault(k, []).append(float(v))
print(f"{'mode':<12}" + "".join(f"{k:>26}" for k in next(iter(rows.values()))))
for mode, cols in rows.items():
    print(f"{mode:<12}" + "".join(
        f"{statistics.median(v):>12.2f} [{min(v):.2f}-{max(v):.2f}]".rjust(26) for v in cols.values()))
EOF
}

# The node (service name) that the monitor group has made primary, settled or not.
current_primary() {
  state | awk '$3 == "primary" || $3 == "wait_primary" {print $1; exit}'
}

case $MODE in
  test) run_test ;;
  bench) run_bench "${2:-3}" ;;
  *) fail "usage: tests/compose.sh [test | bench RUNS]" ;;
esac
