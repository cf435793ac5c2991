#!/usr/bin/env bash
# `capgate gateway` in front of foreign Cap'n Proto servers: the demo Store served by pycapnp
# (store_server.py) and by Cap'n Proto C++ (cxx/store_server.c++, built here), driven by
# pycapnp clients through the gateway. For each upstream:
#   - TCP upstream: store_client.py (TCP and Unix listeners) and gateway_client.py scenario
#     (every method, the upstream's Watcher calls, its exception texts, releases both ways);
#     the upstream killed mid-call (the call fails naming it), restarted on the same port (a
#     new client is served by the same gateway); SIGTERM, exit 0.
#   - Unix upstream: the same scenario; SIGTERM, exit 0.
#   - Policies: denials answered at the gateway and never seen upstream (gateway_policy.toml),
#     policy_client.py's denial, method rule and rate checks (policy.toml), and the
#     gateway's accounting of capabilities and answers both ways under tight quotas
#     (gateway_quotas.toml).
# Needs g++, Cap'n Proto's C++ headers and libraries (Debian: libcapnp-dev) and `capnp`.
# Usage: tests/interop/gateway.sh PATH-TO-CAPGATE-BINARY PYTHON
set -euo pipefail
bin=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
python=$2
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
started=$SECONDS

# The processes started here and not yet reaped: on exit, each is killed.
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# reaped PID: PID has ended and was waited for; it is no longer ours to kill.
reaped() {
  local p kept=()
  for p in "${pids[@]}"; do [[ $p == "$1" ]] || kept+=("$p"); done
  pids=("${kept[@]}")
}

fail() {
  echo "gateway interop FAILED: $*" >&2
  local f
  for f in "$work"/*.log "$work"/*.err; do
    [[ -s "$f" ]] || continue
    echo "--- $(basename "$f") (last 40 lines)" >&2
    tail -n 40 "$f" >&2
  done
  exit 1
}

# wait_for FILE PID WHAT: until FILE has a `listening on` line (10 s), or PID died.
wait_for() {
  local _
  for _ in $(seq 100); do
    grep -q '^listening on' "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || fail "$3 exited before listening"
    sleep 0.1
  done
  fail "$3 did not report listening within 10 s"
}

# tcp_port FILE: the port of FILE's first `listening on tcp://127.0.0.1:PORT` line.
tcp_port() {
  sed -n 's/^listening on tcp:\/\/127\.0\.0\.1:\([0-9]*\)$/\1/p' "$1" | head -n 1
}

# gone PID WHAT: waits (10 s) for PID to end and reaps it (quietly, if it was killed).
gone() {
  timeout 10 tail --pid="$1" -f /dev/null || fail "$2 still running"
  { wait "$1" || true; } 2>/dev/null
  reaped "$1"
}

echo "==> building the C++ upstream"
mkdir -p "$work/cxx"
capnp compile -oc++:"$work/cxx" --src-prefix="$root/schema" "$root/schema/store.capnp"
if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists capnp-rpc; then
  capnp_flags=$(pkg-config --cflags --libs capnp-rpc)
else
  capnp_flags="-lcapnp-rpc -lcapnp -lkj-async -lkj -pthread"
fi
# shellcheck disable=SC2086 # the flags are words
g++ -std=c++17 -O1 -I"$work/cxx" -o "$work/cxx/store_server" "$here/cxx/store_server.c++" \
  "$work/cxx/store.capnp.c++" $capnp_flags || fail "building cxx/store_server.c++"

# start_upstream KIND NAME (tcp PORT | unix PATH): runs the KIND (py or cxx) upstream with its
# log in $work/NAME.log; sets up_pid (and up_port for tcp).
start_upstream() {
  local kind=$1 name=$2
  shift 2
  local addr=("$@")
  [[ ${addr[0]} == tcp ]] && addr=(tcp 127.0.0.1 "${addr[1]}")
  case $kind in
    py) "$python" "$here/store_server.py" "${addr[@]}" >"$work/$name.log" 2>"$work/$name.err" & ;;
    cxx) "$work/cxx/store_server" "${addr[@]}" >"$work/$name.log" 2>"$work/$name.err" & ;;
  esac
  up_pid=$!
  pids+=("$up_pid")
  wait_for "$work/$name.log" "$up_pid" "upstream $name"
  up_port=$(tcp_port "$work/$name.log")
}

# start_gateway NAME ARGS...: capgate gateway on 127.0.0.1:0 and $work/NAME.sock with ARGS;
# sets gw_pid, gw_port, gw_sock. Its stderr (RUST_LOG=debug) is $work/NAME.err.
start_gateway() {
  local name=$1
  shift
  gw_sock="$work/$name.sock"
  RUST_LOG=${RUST_LOG:-debug} "$bin" gateway --listen 127.0.0.1:0 --unix "$gw_sock" "$@" \
    >"$work/$name.out" 2>"$work/$name.err" &
  gw_pid=$!
  pids+=("$gw_pid")
  for _ in $(seq 100); do
    [[ $(grep -c '^listening on' "$work/$name.out" 2>/dev/null || true) == 2 ]] && break
    kill -0 "$gw_pid" 2>/dev/null || fail "gateway $name exited at start"
    sleep 0.1
  done
  gw_port=$(tcp_port "$work/$name.out")
  [[ -n "$gw_port" ]] || fail "gateway $name did not report its port"
}

# stop_gateway NAME: SIGTERM; it must exit 0 within 30 s and remove its socket file.
stop_gateway() {
  kill -TERM "$gw_pid"
  timeout 30 tail --pid="$gw_pid" -f /dev/null || fail "gateway $1 did not exit after SIGTERM"
  local status=0
  wait "$gw_pid" || status=$?
  reaped "$gw_pid"
  [[ $status == 0 ]] || fail "gateway $1 exited with $status after SIGTERM"
  [[ ! -e "$gw_sock" ]] || fail "gateway $1 left its socket file behind"
  grep -E 'panicked|ERROR' "$work/$1.err" && fail "gateway $1 logged an error or a panic"
  echo "ok: gateway $1 exited 0 on SIGTERM"
}

client() {
  local status=0
  timeout 120 "$python" "$@" || status=$?
  [[ $status == 0 ]] || fail "$(basename "$1") ${2:-} exited with $status"
}

# The gateways the Store scenarios run through allow 5 MiB messages (the default is 4 MiB).
# A connection that refuses a message reads and discards at most max_message_bytes + 64 KiB
# (for up to 1 s) before it closes, so that the client reads the refusal (the linger).
# store_client.py's oversized message (5 MiB + 168 bytes) fits in that with a 5 MiB limit.
# With the default limit ~1 MiB of it is left unread, the socket is reset while the client
# still writes, and the client may see EPIPE instead of the reason: about 1 run in 20,
# `capgate serve` as often.
for kind in py cxx; do
  echo
  echo "==> $kind upstream over TCP"
  start_upstream "$kind" "$kind-tcp" tcp 0
  port=$up_port
  start_gateway "gw-$kind-tcp" --upstream "tcp://127.0.0.1:$port" --max-message-bytes "5 MiB"
  client "$here/store_client.py" tcp 127.0.0.1 "$gw_port"
  client "$here/store_client.py" unix "$gw_sock"
  client "$here/gateway_client.py" scenario "$work/$kind-tcp.log" tcp 127.0.0.1 "$gw_port"

  echo
  echo "==> $kind upstream killed while the gateway runs, then restarted on port $port"
  disown "$up_pid" # the client kills it: no job notice from bash
  client "$here/gateway_client.py" kill "$work/$kind-tcp.log" tcp 127.0.0.1 "$gw_port" "$up_pid" "$port"
  gone "$up_pid" "the killed upstream"
  start_upstream "$kind" "$kind-tcp-again" tcp "$port"
  [[ $up_port == "$port" ]] || fail "the upstream restarted on $up_port, not $port"
  client "$here/gateway_client.py" fresh "$work/$kind-tcp-again.log" tcp 127.0.0.1 "$gw_port"
  client "$here/gateway_client.py" fresh "$work/$kind-tcp-again.log" unix "$gw_sock"
  stop_gateway "gw-$kind-tcp"

  echo
  echo "==> $kind upstream with policies"
  start_gateway "gw-$kind-policy" --upstream "tcp://127.0.0.1:$port" \
    --policy "$here/gateway_policy.toml" --schema "$root/schema/store.capnp"
  client "$here/gateway_client.py" policy "$work/$kind-tcp-again.log" tcp 127.0.0.1 "$gw_port"
  stop_gateway "gw-$kind-policy"
  start_gateway "gw-$kind-rates" --upstream "tcp://127.0.0.1:$port" --policy "$here/policy.toml"
  client "$here/policy_client.py" 127.0.0.1 "$gw_port"
  stop_gateway "gw-$kind-rates"
  start_gateway "gw-$kind-quotas" --upstream "tcp://127.0.0.1:$port" --policy "$here/gateway_quotas.toml"
  client "$here/gateway_client.py" churn "$work/$kind-tcp-again.log" tcp 127.0.0.1 "$gw_port"
  stop_gateway "gw-$kind-quotas"
  kill -TERM "$up_pid"
  gone "$up_pid" "upstream $kind-tcp-again"

  echo
  echo "==> $kind upstream over a Unix socket"
  start_upstream "$kind" "$kind-unix" unix "$work/$kind-up.sock"
  start_gateway "gw-$kind-unix" --upstream "unix:$work/$kind-up.sock" --max-message-bytes "5 MiB"
  client "$here/store_client.py" tcp 127.0.0.1 "$gw_port"
  client "$here/gateway_client.py" scenario "$work/$kind-unix.log" unix "$gw_sock"
  stop_gateway "gw-$kind-unix"
  kill -TERM "$up_pid"
  gone "$up_pid" "upstream $kind-unix"
done

echo
echo "gateway interop: pycapnp and C++ upstreams over TCP and Unix, through the gateway's TCP and Unix listeners, with and without policies, upstream killed and restarted, passed in $((SECONDS - started)) s"
