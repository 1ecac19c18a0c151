#!/usr/bin/env bash
# `make bench`: lb-proxy against Kamailio 5.6 on loopback (127.0.8.x), results in BENCHMARKS.md.
#
#   ./bench/run.sh                      # full run, about 15-20 minutes
#   BENCH_PHASES=rate BENCH_TRANSPORTS=udp ./bench/run.sh   # a part (see bench/bench.py)
#
# Installs what is missing on a Debian machine (Kamailio from Debian, sip-tester, tcpdump,
# python3), builds the release binary, then runs bench/bench.py. Kamailio never runs as a
# system service here: if the package's install started one, it is stopped; the bench starts
# its own from bench/kamailio/kamailio.cfg and stops it by PID.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WORK="${BENCH_WORKDIR:-$ROOT/target/bench-run}"
export BENCH_WORKDIR="$WORK"

say() { echo "[bench] $*"; }

# --- what the bench needs -------------------------------------------------------------------
missing=()
command -v kamailio >/dev/null || missing+=(kamailio)
command -v kamcmd >/dev/null || missing+=(kamailio)
command -v sipp >/dev/null || missing+=(sip-tester)
command -v tcpdump >/dev/null || missing+=(tcpdump)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # policy-rc.d or not, a service the package starts is stopped right below.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# A system Kamailio (started by the package) must not run beside ours.
if command -v systemctl >/dev/null && systemctl is-active --quiet kamailio 2>/dev/null; then
  say "stopping the kamailio system service (started by the package)"
  systemctl stop kamailio || true
fi
if [ -f /run/kamailio/kamailio.pid ]; then
  pid="$(cat /run/kamailio/kamailio.pid 2>/dev/null || true)"
  if [ -n "$pid" ] && grep -q kamailio "/proc/$pid/cmdline" 2>/dev/null; then
    say "stopping the kamailio service process $pid"
    if command -v service >/dev/null; then service kamailio stop || kill "$pid" || true; else kill "$pid" || true; fi
  fi
fi

# lb-proxy signs its Record-Route as deployed (the chart always sets a key): the cost of the
# relay rule's proof is in the figures (docs/relay-policy.md).
export LB_PROXY_ROUTE_KEY="${LB_PROXY_ROUTE_KEY:-bench-route-key-0123456789abcdef}"

# --- build -------------------------------------------------------------------------------------
# (the binary lands in $CARGO_TARGET_DIR/release when that is set: bench.py looks there;
# with BENCH_LB_BIN, a binary built before, nothing is built)
if [ -z "${BENCH_LB_BIN:-}" ]; then
  say "cargo build --release -p lb-proxy"
  cargo build --release -p lb-proxy
fi

# --- run -----------------------------------------------------------------------------------------
# Many sockets and 100k dialogs: as many open files as allowed.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# Whatever a killed interpreter left running is stopped by the PIDs it recorded in $WORK/pids
# ("PID<TAB>marker", only processes still running); a PID is signalled only while its command
# line still carries the marker (a 127.0.8.x address or a bench/ path), so a reused PID is
# never hit.
# shellcheck disable=SC2317  # (functions called from traps)
ours() { [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$2"; }
cleanup() {
  local pidfile="$WORK/pids" pid marker left
  [ -s "$pidfile" ] || return 0
  while IFS=$'\t' read -r pid marker; do
    if [ -n "$pid" ] && ours "$pid" "$marker"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done <"$pidfile"
  for _ in 1 2 3 4 5 6; do
    left=0
    while IFS=$'\t' read -r pid marker; do
      [ -n "$pid" ] && ours "$pid" "$marker" && left=1
    done <"$pidfile"
    [ "$left" -eq 0 ] && return 0
    sleep 0.5
  done
  while IFS=$'\t' read -r pid marker; do
    if [ -n "$pid" ] && ours "$pid" "$marker"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done <"$pidfile"
}
trap cleanup EXIT

# The harness runs in the background so that a signal to this script reaches it at once:
# it is forwarded as SIGTERM, on which bench.py stops everything it started and exits.
python3 "$ROOT/bench/bench.py" &
PY=$!
stop() { kill -TERM "$PY" 2>/dev/null || true; wait "$PY" 2>/dev/null || true; exit 130; }
trap stop INT TERM HUP
status=0
wait "$PY" || status=$?
exit "$status"
