#!/usr/bin/env bash
# Flood measurement: normal sipp calls through lb-proxy while it is flooded with garbage and
# with INVITEs from one source; prints the success rate of the normal calls and the proxy's
# CPU and memory per phase (tests/flood/README.md). Loopback only, addresses 127.0.1.50-55 by
# default (FLOOD_BASE). Takes about 2 minutes; never fails on the figures themselves.
#
#   tests/flood/run.sh
#   FLOOD_SECS=10 FLOOD_PHASES=baseline,garbage tests/flood/run.sh
#   LB_PROXY=/path/to/other/lb-proxy tests/flood/run.sh    # measure another build
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
command -v sipp >/dev/null || { echo "flood: sipp missing (Debian package sip-tester)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "flood: python3 missing" >&2; exit 1; }
if [ -z "${LB_PROXY:-}" ]; then
  cargo build --release -p lb-proxy -j "${CARGO_JOBS:-1}"
  export LB_PROXY="$ROOT/target/release/lb-proxy"
fi
exec python3 "$ROOT/tests/flood/flood.py"
