#!/usr/bin/env bash
# Demo: lb-proxy balancing sipp calls over two sipp "MRCP servers" on 127.0.0.1.
#
#   scripts/demo.sh [path/to/lb-proxy]      (default: target/release/lb-proxy; builds nothing)
#
# Starts the proxy on examples/standalone.yaml (UDP+TCP 127.0.0.1:5060, admin :8081,
# destinations :5080 pstn=100 and :5090 pstn=50), a sipp server on each of :5080 and :5090,
# and a sipp client making RATE calls/s of CALL_MS ms for SECONDS s. While the client runs it
# prints each destination's load every second; at the end, how many calls each server took.
# Everything it started is stopped by PID on exit. Needs sipp (sip-tester) and curl.
# Environment: RATE (default 40), SECONDS_TOTAL (20), CALL_MS (2000), CONFIG, KEEP=1 keeps logs.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${1:-$ROOT/target/release/lb-proxy}"
CONFIG="${CONFIG:-$ROOT/examples/standalone.yaml}"
SCEN="$ROOT/tests/sipp"
RATE="${RATE:-40}"
SECONDS_TOTAL="${SECONDS_TOTAL:-20}"
CALL_MS="${CALL_MS:-2000}"
IP=127.0.0.1
ADMIN="http://$IP:8081"

for tool in sipp curl; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is not installed" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "demo: no proxy binary at $BIN (cargo build --release -p lb-proxy, or pass its path)" >&2; exit 1; }

WORK="$(mktemp -d -t mrcp-lb-demo.XXXXXX)"
PIDS=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
    echo "demo: logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "demo: proxy $BIN --config $CONFIG (log: $WORK/proxy.log)"
"$BIN" --config "$CONFIG" 2>"$WORK/proxy.log" >/dev/null </dev/null &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
for _ in $(seq 100); do
  curl -sf "$ADMIN/v1/dialogs/stats" >/dev/null 2>&1 && break
  kill -0 "$PROXY_PID" 2>/dev/null || { echo "demo: proxy exited:" >&2; tail -20 "$WORK/proxy.log" >&2; exit 1; }
  sleep 0.1
done
curl -sf "$ADMIN/v1/dialogs/stats" >/dev/null || { echo "demo: proxy admin API not answering" >&2; exit 1; }

# start_server NAME PORT CONTROL_PORT MEDIA_PORT; sets LAST_PID
start_server() {
  mkdir -p "$WORK/$1"
  (cd "$WORK/$1" && exec sipp -sf "$SCEN/uas.xml" -i "$IP" -p "$2" -nostdin -trace_err -trace_counts \
      -trace_stat -stf stat.csv -fd 1 -ci "$IP" -cp "$3" -mp "$4" </dev/null >screen.log 2>&1) &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
start_server server1 5080 8891 16000; S1=$LAST_PID
start_server server2 5090 8892 16100; S2=$LAST_PID
sleep 0.5

print_loads() {
  local json stats
  json="$(curl -s "$ADMIN/v1/destinations" || true)"
  stats="$(curl -s "$ADMIN/v1/dialogs/stats" || true)"
  if command -v jq >/dev/null; then
    printf '%s  %s  | %s\n' "$1" \
      "$(jq -r '[.destinations[] | "dest \(.id) \(.state) " + ([.resources[] | "\(.name) \(.load)/\(.capacity)"] | join(","))] | join("  |  ")' <<<"$json" 2>/dev/null || echo "$json")" \
      "$(jq -r '"active \(.active) early \(.early) processed \(.processed) failed \(.failed)"' <<<"$stats" 2>/dev/null || echo "$stats")"
  else
    printf '%s  %s  %s\n' "$1" "$json" "$stats"
  fi
}

CALLS=$((RATE * SECONDS_TOTAL))
echo "demo: client: $CALLS calls at $RATE/s, ${CALL_MS} ms each"
mkdir -p "$WORK/client"
(cd "$WORK/client" && exec sipp -sf "$SCEN/uac.xml" -i "$IP" -p 5070 -nostdin -trace_err -trace_stat \
    -stf stat.csv -fd 1 -ci "$IP" -cp 8893 -mp 16200 -r "$RATE" -m "$CALLS" -l 1000 -d "$CALL_MS" \
    -timeout "$((SECONDS_TOTAL * 3 + 30))s" -timeout_error "$IP:5060" </dev/null >screen.log 2>&1) &
CLIENT_PID=$!
PIDS+=("$CLIENT_PID")

t=0
while kill -0 "$CLIENT_PID" 2>/dev/null; do
  print_loads "t=${t}s"
  sleep 1
  t=$((t + 1))
done
set +e
wait "$CLIENT_PID"
CLIENT_RC=$?
set -e
print_loads "end  "

# sum, on the last row of the sipp CSV $1, of the columns whose name ends with $2
csv_last() {
  awk -F';' -v suf="$2" '
    NR == 1 { for (i = 1; i <= NF; i++)
                if (length($i) >= length(suf) && substr($i, length($i) - length(suf) + 1) == suf) col[i] = 1
              next }
    NF > 1  { last = $0 }
    END     { split(last, v, ";"); s = 0; for (i in col) s += v[i]; print s }' "$1"
}

# stop the servers gracefully so they write their final counts
kill -USR1 "$S1" "$S2" 2>/dev/null || true
for pid in "$S1" "$S2"; do
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done

echo
echo "client: exit $CLIENT_RC, successful $(csv_last "$WORK/client/stat.csv" 'SuccessfulCall(C)'), failed $(csv_last "$WORK/client/stat.csv" 'FailedCall(C)')"
for s in server1 server2; do
  counts=""
  for f in "$WORK/$s"/*_counts.csv; do [ -f "$f" ] && counts="$f"; done
  echo "$s: $( [ -n "$counts" ] && csv_last "$counts" '_INVITE_Recv' || echo '?') calls"
done
exit "$CLIENT_RC"
