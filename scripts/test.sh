#!/bin/bash
# The whole test suite, as CI runs it: formatting, lints, then every test (unit, property,
# VM-less client, real guests under QEMU). Run scripts/setup.sh first (the README does).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${CARGO_HOME:-}" ] || [ ! -f "$HOME/.cargo/env" ] || . "$HOME/.cargo/env"

cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace --all-targets

# The daemon's dependency tree carries none of the harness's or the tests' crates (they live in
# the cormorant-bench and cormorant-frontend crates of the workspace).
if cargo tree --locked -p cormorant -e normal --prefix none | grep -E '^(plotters|hdrhistogram|tempfile|criterion|proptest) '; then
    echo "test: the daemon depends on a benchmark or test crate (above)" >&2
    exit 1
fi

# A short fuzzing run of every target, so the targets keep building and the parsers keep
# holding; long runs are for developers (see fuzz/README.md).
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    for target in $(cd fuzz && cargo +nightly fuzz list); do
        # Targets with seed inputs (fuzz/seeds/<target>) start from them as well.
        corpus=()
        if [ -d "fuzz/seeds/$target" ]; then
            mkdir -p "fuzz/corpus/$target"
            corpus=("corpus/$target" "seeds/$target")
        fi
        (cd fuzz && cargo +nightly fuzz run "$target" "${corpus[@]}" -- -max_total_time=20 -print_final_stats=0) 2>&1 | tail -n 2
    done
else
    echo "test: cargo-fuzz or the nightly toolchain is missing: fuzz targets not run"
fi
