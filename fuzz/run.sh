#!/usr/bin/env bash
# Bounded fuzz run of every lb-proxy fuzz target: fuzz/run.sh [SECONDS] (default 60 each).
#
# Installs cargo-fuzz when missing (cached in ~/.cargo/bin), builds the targets with nightly
# Rust (installed with rustup when missing; when that cannot download, stable with
# RUSTC_BOOTSTRAP=1), then runs each target for SECONDS, one job, starting from the seed corpus
# in fuzz/corpus/<target> and the inputs found by earlier runs in fuzz/work/<target> (not
# committed). Fails on the first crash, leak or timeout, leaving the input in
# fuzz/artifacts/<target>/ and the log in fuzz/work/<target>.log.
#
# Environment: FUZZ_TARGETS (default: all three), FUZZ_JOBS (cargo build jobs, default 1).
set -euo pipefail

cd "$(dirname "$0")"
SECONDS_EACH="${1:-60}"
TARGETS="${FUZZ_TARGETS:-sip_datagram tcp_stream proxy_core}"
export CARGO_BUILD_JOBS="${FUZZ_JOBS:-1}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz into ~/.cargo/bin"
  cargo install cargo-fuzz --locked
fi

# cargo-fuzz needs nightly compiler flags (-Z..., sanitizer coverage).
TOOLCHAIN=(+nightly)
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: installing the nightly toolchain"
  if ! rustup toolchain install nightly --profile minimal; then
    echo "fuzz: nightly cannot be installed here; building with stable and RUSTC_BOOTSTRAP=1"
    TOOLCHAIN=(+stable)
    export RUSTC_BOOTSTRAP=1
  fi
fi

# No sanitizer: lb-proxy forbids unsafe code, and without ASan each target runs several times
# faster. Release build with debug assertions and overflow checks (cargo-fuzz's default).
cargo "${TOOLCHAIN[@]}" fuzz build --sanitizer none

mkdir -p work
status=0
for t in $TARGETS; do
  mkdir -p "work/$t"
  log="work/$t.log"
  echo "fuzz: $t for ${SECONDS_EACH}s"
  # New inputs go to work/<target> (the first directory); corpus/<target> is only read.
  if cargo "${TOOLCHAIN[@]}" fuzz run --sanitizer none "$t" "work/$t" "corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -timeout=20 -dict=sip.dict -print_final_stats=1 \
      >"$log" 2>&1; then
    # The last coverage line and the final statistics, as libFuzzer printed them.
    grep -E '^#[0-9]+' "$log" | tail -n 1 || true
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' "$log" || true
  else
    status=1
    echo "fuzz: $t FAILED (whole log: fuzz/$log)" >&2
    # The panic message (without the backtrace) and libFuzzer's verdict with the input's path.
    sed -n '/panicked at/,/stack backtrace/p' "$log" | grep -v 'stack backtrace' | head -n 40 >&2
    grep -E 'ERROR: libFuzzer|SUMMARY|Test unit written to' "$log" >&2 || true
    echo "fuzz: reproduce with: cd fuzz && cargo +nightly fuzz run --sanitizer none $t <artifact>" >&2
    echo "fuzz: keep the input as a regression: cp <artifact> lb-proxy/tests/fuzz-regressions/$t/<name>" >&2
    echo "fuzz: (cargo test -p lb-proxy-fuzz-checks then replays it on stable)" >&2
    break
  fi
done
exit "$status"
