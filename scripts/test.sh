#!/usr/bin/env bash
# The whole test suite: unit tests, the integration tests in tests/ (the real binary on
# loopback ports, in front of the built-in sandbox), the benches compiled and run once as
# tests, and the doc examples.
#
# Beyond the Rust toolchain, one test runs the official Genesys Cloud Python SDK against
# the proxy: this script installs it into target/sdk-venv from PyPI first (and Python
# itself from the OS packages when it is missing and we are root).
set -euo pipefail
cd "$(dirname "$0")/.."

SDK_VERSION=269.0.0
venv=target/sdk-venv
if ! "$venv/bin/python" -c "import PureCloudPlatformClientV2" 2>/dev/null; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "scripts/test.sh: installing python3 and python3-venv (for the Genesys SDK test)"
      apt-get install -y python3 python3-venv >/dev/null
    else
      echo "scripts/test.sh: python3 with venv is needed for the Genesys SDK test; install it" >&2
      exit 1
    fi
  fi
  echo "scripts/test.sh: installing PureCloudPlatformClientV2==$SDK_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "PureCloudPlatformClientV2==$SDK_VERSION"
fi
export TOKENGATE_SDK_PYTHON="$PWD/$venv/bin/python"

cargo test --all-targets "$@"
cargo test --doc
