#!/usr/bin/env bash
# The one command that runs every test: installs what the tests need (once), builds the
# binaries, runs `cargo test`. Extra arguments go to `cargo test`, e.g.
#   scripts/test.sh --test python_client
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
TIMES=()
stage() { TIMES+=("$(printf '%-8s %4ss' "$CUR" $((SECONDS - T0)))"); }
begin() { [ -z "${CUR:-}" ] || stage; CUR=$1; T0=$SECONDS; echo "==> $1: $2"; }
# Stage times, printed on every exit (a failing `cargo test` included).
summary() { [ -z "${CUR:-}" ] || stage; echo "==> stage times (total $((SECONDS - START))s):"; printf '    %s\n' "${TIMES[@]}"; }
trap summary EXIT

# py-spiffe and the libraries the Python client tests use directly (checked on PyPI;
# spiffe 0.3.2 is the newest and needs Python >= 3.10).
PY_PKGS=(spiffe==0.3.2 cryptography==50.0.2 grpcio==1.85.1 protobuf==7.36.2)
# Debian's interpreter, not pyenv's under /root (0700): the venv must also run as
# uid 65534, which the python_client tests use for an unregistered workload.
SYS_PY=/usr/bin/python3.11

# 1. System packages: openssl, curl and systemd-analyze (the tests call them), a venv-capable
#    Debian python. apt only runs when something is missing.
begin system "openssl, curl, systemd-analyze, $SYS_PY"
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
command -v systemd-analyze >/dev/null || missing+=(systemd)
"$SYS_PY" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3.11-venv)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# 2. Python venv at .venv with the pinned packages; reused when it already matches.
begin python ".venv with ${PY_PKGS[*]}"
VENV_OK="import sys, importlib.metadata as m, spiffe
pins = dict(p.split('==') for p in sys.argv[1:])
assert sys.base_prefix == '/usr', sys.base_prefix
assert all(m.version(n) == v for n, v in pins.items())"
if ! .venv/bin/python -c "$VENV_OK" "${PY_PKGS[@]}" 2>/dev/null; then
  "$SYS_PY" -m venv --clear .venv
  .venv/bin/pip install -q --disable-pip-version-check "${PY_PKGS[@]}"
  .venv/bin/python -c "$VENV_OK" "${PY_PKGS[@]}"
fi
export LANYARD_PYTHON="$ROOT/.venv/bin/python"

command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"

# 3. The dependency tree: no aws-lc or openssl, only allowed licenses, only crates.io
#    (deny.toml). Advisories are not checked: they need a network CI lacks.
begin deny "cargo deny check bans licenses sources"
DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -qF "$DENY_VERSION"; then
  cargo install cargo-deny --locked --version "$DENY_VERSION" -q
fi
cargo deny check bans licenses sources

# 4. Build the binaries the end-to-end tests start, then run every test (dev profile).
begin build "cargo build --workspace --bins --locked"
cargo build --workspace --bins --locked
begin test "cargo test --workspace --locked $*"
log=$(mktemp)
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary, the last of
# which is often an empty doc-test run).
totals=$(awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed", p, f }' "$log")
rm -f "$log"
trap - EXIT
summary
echo "$totals"
exit "$status"
