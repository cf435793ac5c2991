#!/usr/bin/env bash
# Drives `capgate serve` from pycapnp (Cap'n Proto's C++ implementation) over TCP and a Unix
# socket, then stops it with SIGTERM and checks it exits 0.
# Usage: tests/interop/run.sh PATH-TO-CAPGATE-BINARY PYTHON
set -euo pipefail
bin=$1
python=$2
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

"$bin" serve --listen 127.0.0.1:0 --unix "$work/store.sock" >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 100); do
  [[ $(grep -c '^listening on' "$work/out" 2>/dev/null || true) == 2 ]] && break
  sleep 0.1
done
cat "$work/out"
port=$(sed -n 's/^listening on tcp:\/\/127\.0\.0\.1:\([0-9]*\)$/\1/p' "$work/out")
[[ -n "$port" ]] || { echo "capgate serve did not report its port" >&2; cat "$work/err" >&2; exit 1; }

timeout 60 "$python" "$here/store_client.py" tcp 127.0.0.1 "$port"
timeout 60 "$python" "$here/store_client.py" unix "$work/store.sock"

kill -TERM "$pid"
status=0
timeout 30 tail --pid="$pid" -f /dev/null || { echo "capgate serve did not exit after SIGTERM" >&2; exit 1; }
wait "$pid" || status=$?
[[ $status == 0 ]] || { echo "capgate serve exited with $status" >&2; cat "$work/err" >&2; exit 1; }
[[ ! -e "$work/store.sock" ]] || { echo "socket file left behind" >&2; exit 1; }

# With a policy: denials and overload as pycapnp sees them.
"$bin" serve --listen 127.0.0.1:0 --policy "$here/policy.toml" >"$work/out2" 2>"$work/err2" &
pid=$!
for _ in $(seq 100); do
  grep -q '^listening on' "$work/out2" 2>/dev/null && break
  sleep 0.1
done
port=$(sed -n 's/^listening on tcp:\/\/127\.0\.0\.1:\([0-9]*\)$/\1/p' "$work/out2")
[[ -n "$port" ]] || { echo "capgate serve --policy did not report its port" >&2; cat "$work/err2" >&2; exit 1; }
timeout 60 "$python" "$here/policy_client.py" 127.0.0.1 "$port"
kill -TERM "$pid"
wait "$pid" || { echo "capgate serve --policy exited with an error" >&2; cat "$work/err2" >&2; exit 1; }


# TLS with client certificates (Python's ssl module under pycapnp).
"$bin" dev-certs "$work/certs" >/dev/null
"$bin" serve --listen 127.0.0.1:0 --tls-cert "$work/certs/server.pem" --tls-key "$work/certs/server.key" \
  --client-ca "$work/certs/ca.pem" --require-client-cert --policy "$here/tls_policy.toml" >"$work/out3" 2>"$work/err3" &
pid=$!
for _ in $(seq 100); do
  grep -q '^listening on' "$work/out3" 2>/dev/null && break
  sleep 0.1
done
port=$(sed -n 's/^listening on tcp:\/\/127\.0\.0\.1:\([0-9]*\)$/\1/p' "$work/out3")
[[ -n "$port" ]] || { echo "capgate serve (TLS) did not report its port" >&2; cat "$work/err3" >&2; exit 1; }
timeout 60 "$python" "$here/tls_client.py" 127.0.0.1 "$port" "$work/certs"
kill -TERM "$pid"
wait "$pid" || { echo "capgate serve (TLS) exited with an error" >&2; cat "$work/err3" >&2; exit 1; }

echo "interop: pycapnp over TCP, Unix and TLS, with and without a policy, passed; serve exited cleanly on SIGTERM"
