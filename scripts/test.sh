#!/bin/bash
# The whole test suite, as CI runs it: formatting, lints, then every test (unit, property,
# VM-less client, real guests under QEMU). Run scripts/setup.sh first (the README does).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${CARGO_HOME:-}" ] || [ ! -f "$HOME/.cargo/env" ] || . "$HOME/.cargo/env"

cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
