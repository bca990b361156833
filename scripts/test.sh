#!/usr/bin/env bash
# The whole test suite: unit tests, the integration tests in tests/ (the real binary on
# loopback ports, in front of the built-in sandbox), the benches compiled and run once as
# tests, and the doc examples. Needs nothing but the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-targets "$@"
cargo test --doc
