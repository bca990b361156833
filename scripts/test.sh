#!/usr/bin/env bash
# The whole test suite: unit tests, the integration tests in tests/ (the real binary on
# loopback ports, in front of the sandbox crate), the benches compiled and run once as
# tests, and the doc examples.
#
# Beyond the Rust toolchain, some tests need programs this script installs first:
# - the official Genesys Cloud Python SDK and websocket-client (a plain WebSocket client,
#   for the notification test), into target/sdk-venv from PyPI (and Python itself from the
#   OS packages when it is missing);
# - Debian's chromium, which renders the operator's status page;
# - Debian's redis-server, which the replica tests start on free ports;
# - Debian's tinyproxy, the corporate egress proxy of the enterprise tests;
# - systemd's systemd-analyze, which rates the hardening of deploy/tokengate.service;
# - Debian's nginx-light, an HTTPS API host (HTTP/2 and HTTP/1.1) that ends connections
#   on its own schedule.
# OS packages are installed with apt-get when we are root; otherwise the script says what
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SDK_VERSION=269.0.0
WEBSOCKET_CLIENT_VERSION=1.8.0
venv=target/sdk-venv
if ! "$venv/bin/python" -c "import PureCloudPlatformClientV2, websocket" 2>/dev/null; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "scripts/test.sh: installing python3 and python3-venv (for the Genesys SDK test)"
      apt-get install -y python3 python3-venv >/dev/null || { apt-get update >/dev/null && apt-get install -y python3 python3-venv >/dev/null; }
    else
      echo "scripts/test.sh: python3 with venv is needed for the Genesys SDK test; install it" >&2
      exit 1
    fi
  fi
  echo "scripts/test.sh: installing PureCloudPlatformClientV2==$SDK_VERSION and websocket-client==$WEBSOCKET_CLIENT_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "PureCloudPlatformClientV2==$SDK_VERSION" "websocket-client==$WEBSOCKET_CLIENT_VERSION"
fi
export TOKENGATE_SDK_PYTHON="$PWD/$venv/bin/python"

if [ -z "${TOKENGATE_CHROMIUM:-}" ]; then
  if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "scripts/test.sh: installing chromium (for the status page test)"
      apt-get install -y chromium >/dev/null || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; }
    else
      echo "scripts/test.sh: chromium is needed for the status page test; install it (Debian: apt-get install chromium)" >&2
      exit 1
    fi
  fi
  TOKENGATE_CHROMIUM="$(command -v chromium)"
  export TOKENGATE_CHROMIUM
fi

if [ -z "${TOKENGATE_REDIS_SERVER:-}" ] && ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "scripts/test.sh: installing redis-server (for the replica tests)"
    apt-get install -y redis-server >/dev/null || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; }
  else
    echo "scripts/test.sh: redis-server is needed for the replica tests; install it (Debian: apt-get install redis-server)" >&2
    exit 1
  fi
fi

if [ -z "${TOKENGATE_TINYPROXY:-}" ] && ! command -v tinyproxy >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "scripts/test.sh: installing tinyproxy (for the egress proxy tests)"
    apt-get install -y tinyproxy >/dev/null || { apt-get update >/dev/null && apt-get install -y tinyproxy >/dev/null; }
  else
    echo "scripts/test.sh: tinyproxy is needed for the egress proxy tests; install it (Debian: apt-get install tinyproxy)" >&2
    exit 1
  fi
fi

if [ -z "${TOKENGATE_NGINX:-}" ] && ! command -v nginx >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "scripts/test.sh: installing nginx-light (the API host that ends connections on its own schedule)"
    apt-get install -y nginx-light >/dev/null || { apt-get update >/dev/null && apt-get install -y nginx-light >/dev/null; }
  else
    echo "scripts/test.sh: nginx is needed for the API host connection tests; install it (Debian: apt-get install nginx-light)" >&2
    exit 1
  fi
fi

if ! command -v systemd-analyze >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "scripts/test.sh: installing systemd (systemd-analyze, for the unit file test)"
    apt-get install -y systemd >/dev/null || { apt-get update >/dev/null && apt-get install -y systemd >/dev/null; }
  else
    echo "scripts/test.sh: systemd-analyze is needed for the unit file test; install it (Debian: apt-get install systemd)" >&2
    exit 1
  fi
fi

# The tests that need chromium, redis-server, tinyproxy, nginx or the SDK are #[ignore]d, so that a plain
# `cargo test` passes on a machine without them; here they run too. The benches run once
# as tests on their own: criterion's harness does not take libtest's --include-ignored.
# Some tests open a thousand connections or more from the test process itself: as many
# descriptors as this user may have (a shell's usual soft limit is 1,024).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo test --workspace --lib --bins --tests "$@" -- --include-ignored
cargo test --workspace --benches "$@"
cargo test --doc
