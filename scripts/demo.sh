#!/usr/bin/env bash
# A complete local trust domain in one command: builds Lanyard, starts a server on the
# embedded SQLite default, attests an agent with a join token, registers an entry for
# the invoking user, and shows a workload (this shell's user) receiving its SVID.
#
#   scripts/demo.sh            # keeps the trust domain running until Ctrl-C
#   scripts/demo.sh --no-wait  # shows the SVID, then stops everything
#
# LANYARD_BIN_DIR=dir skips the build and uses binaries from dir.
set -euo pipefail
cd "$(dirname "$0")/.."

wait_for_ctrl_c=1
[[ "${1:-}" == "--no-wait" ]] && wait_for_ctrl_c=0

if [[ -z "${LANYARD_BIN_DIR:-}" ]]; then
  echo "==> Building (cargo build --release)"
  cargo build --release --bins -q
  LANYARD_BIN_DIR=target/release
fi
server="$LANYARD_BIN_DIR/lanyard-server"
agent="$LANYARD_BIN_DIR/lanyard-agent"

dir=$(mktemp -d /tmp/lanyard-demo.XXXXXX)
chmod 755 "$dir"
mkdir -m 700 "$dir/server-run"
export LANYARD_ADMIN_SOCKET="$dir/server-run/admin.sock"
socket="$dir/agent/api.sock"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

echo "==> Starting lanyard-server for trust domain example.org (data in $dir/server-data)"
"$server" run --trust-domain example.org --bind-address "127.0.0.1:$port" \
  --data-dir "$dir/server-data" --log-level warn 2>"$dir/server.log" &
pids+=($!)
for _ in $(seq 300); do "$server" healthcheck >/dev/null 2>&1 && break; sleep 0.05; done
"$server" healthcheck || { cat "$dir/server.log"; exit 1; }

echo "==> Generating a join token for a runner known as spiffe://example.org/runner"
token=$("$server" token generate --spiffe-id spiffe://example.org/runner | sed -n "s/^Token: //p")
"$server" bundle show >"$dir/bootstrap.pem"

echo "==> Starting lanyard-agent (Workload API at unix://$socket)"
# The token goes in a file only this user can read (or in LANYARD_JOIN_TOKEN), never on
# the command line: every local user can read a process's command line.
(umask 077 && printf '%s\n' "$token" >"$dir/join-token")
agent_args=(--trust-domain example.org --server-address "127.0.0.1:$port"
  --trust-bundle-path "$dir/bootstrap.pem" --data-dir "$dir/agent-data"
  --socket-path "$socket" --join-token-file "$dir/join-token")
"$agent" validate "${agent_args[@]}"
"$agent" run "${agent_args[@]}" --log-level warn 2>"$dir/agent.log" &
pids+=($!)
for _ in $(seq 300); do "$agent" healthcheck --socket-path "$socket" >/dev/null 2>&1 && break; sleep 0.05; done
"$agent" healthcheck --socket-path "$socket" || { cat "$dir/agent.log"; exit 1; }

uid=$(id -u)
echo "==> Registering spiffe://example.org/demo/$(id -un) for processes of uid $uid"
"$server" entry create --spiffe-id "spiffe://example.org/demo/$(id -un)" \
  --parent-id spiffe://example.org/runner --selector "unix:uid:$uid"

echo "==> Fetching this shell's X509-SVID through the SPIFFE Workload API"
for _ in $(seq 50); do
  "$agent" api fetch x509 --socket-path "$socket" --write "$dir/svid" >"$dir/fetch.out" 2>&1 && break
  sleep 0.05
done
cat "$dir/fetch.out"
openssl verify -CAfile "$dir/svid/bundle.0.pem" "$dir/svid/svid.0.pem"
openssl x509 -in "$dir/svid/svid.0.pem" -noout -ext subjectAltName

if (( wait_for_ctrl_c )); then
  echo
  echo "The trust domain is running. In another shell:"
  echo "  export SPIFFE_ENDPOINT_SOCKET=unix://$socket"
  echo "  $agent api watch            # see rotations as they happen"
  echo "  LANYARD_ADMIN_SOCKET=$LANYARD_ADMIN_SOCKET $server entry show"
  echo "Press Ctrl-C to stop and remove everything."
  wait
fi
