#!/usr/bin/env bash
# Soak test: lb-proxy under steady, mixed SIP load for MINUTES (default 30), sipp on both sides.
#
#   tests/soak/run.sh [MINUTES]
#
# Load (about 24 calls/s in all, over UDP): calls of 1 s (15/s), 10 s (6/s) and 60 s (2/s)
# that the caller hangs up, and 1 call/s whose caller goes away without BYE (uac_no_bye.xml):
# those are ended by the proxy when dialogs.lifetime (2 min here) passes. Three sipp servers
# (uas.xml) share the calls. Every 10 s the proxy's RSS and its dialog counters and loads go to
# samples.csv. When MINUTES are over the clients stop making calls; the script waits for the
# last calls to end and the last lifetime to pass, then checks:
#   - no dialog (active or early) open and every destination's load 0;
#   - the proxy counted every call (processed = calls the clients made), failed none, and
#     expired exactly the calls that never hung up;
#   - no sipp client or server saw a failed call;
#   - RSS is flat: at the end of the load (mean of the last 3 samples) within 10% of RSS after
#     the warm-up (5 min; 3 min for runs under 10 min, so at least 5 min are needed), and its
#     least-squares slope over the last 10 minutes of load is at most 1% of that per 10 min.
# Exit status 0 when every check passes.
#
# Addresses: 127.0.10.0/24 only (proxy .1, servers .11-.13, clients .21-.24). Everything it
# starts is stopped by PID on exit. Files go to $SOAK_DIR (default target/soak/<time>/).
# Environment: LB_PROXY (binary; default: cargo build --release -p lb-proxy, then
# target/release/lb-proxy), SOAK_DIR, KEEP_RUNNING_SECONDS (lifetime wait margin, default 45).
set -euo pipefail

MINUTES="${1:-30}"
case "$MINUTES" in '' | *[!0-9]*) echo "soak: MINUTES must be a whole number, got '$MINUTES'" >&2; exit 2 ;; esac
[ "$MINUTES" -ge 1 ] || { echo "soak: MINUTES must be at least 1" >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
SCEN="$ROOT/tests/sipp"
NET=127.0.10
PROXY_IP=$NET.1
ADMIN="http://$PROXY_IP:8081"
LIFETIME_S=120
MARGIN_S="${KEEP_RUNNING_SECONDS:-45}"
OUT="${SOAK_DIR:-$ROOT/target/soak/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

for tool in sipp curl python3; do
  command -v "$tool" >/dev/null || { echo "soak: $tool is not installed" >&2; exit 1; }
done

if [ -n "${LB_PROXY:-}" ]; then
  BIN="$LB_PROXY"
else
  echo "soak: building lb-proxy (release)"
  (cd "$ROOT" && nice cargo build --release -j1 -p lb-proxy --bin lb-proxy >/dev/null)
  BIN="$ROOT/target/release/lb-proxy"
fi
[ -x "$BIN" ] || { echo "soak: no proxy binary at $BIN" >&2; exit 1; }

PIDS=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "soak: $(date +%H:%M:%S) $*"; }

# ---- proxy -----------------------------------------------------------------------------------
cat >"$OUT/proxy.yaml" <<EOF
listeners: [udp:$PROXY_IP:5060]
admin:
  listen: $PROXY_IP:8081
routing:
  resources: [pstn]
  mode: absolute
dialogs:
  lifetime: ${LIFETIME_S}s
destinations:
  - {id: s1, uri: "sip:$NET.11:5080", resources: pstn=1000}
  - {id: s2, uri: "sip:$NET.12:5080", resources: pstn=1000}
  - {id: s3, uri: "sip:$NET.13:5080", resources: pstn=1000}
EOF
"$BIN" --config "$OUT/proxy.yaml" --log-level warn 2>"$OUT/proxy.log" >/dev/null </dev/null &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
for _ in $(seq 100); do
  curl -sf "$ADMIN/readyz" >/dev/null 2>&1 && break
  kill -0 "$PROXY_PID" 2>/dev/null || { echo "soak: proxy exited:" >&2; tail -20 "$OUT/proxy.log" >&2; exit 1; }
  sleep 0.1
done
curl -sf "$ADMIN/readyz" >/dev/null || { echo "soak: proxy not ready" >&2; exit 1; }
log "proxy pid $PROXY_PID ($BIN), files in $OUT"

# ---- sipp --------------------------------------------------------------------------------------
# sipp_run NAME IP CONTROL_PORT MEDIA_PORT ARGS...: starts sipp in $OUT/NAME; sets LAST_PID.
sipp_run() {
  local name=$1 ip=$2 cp=$3 mp=$4
  shift 4
  mkdir -p "$OUT/$name"
  (cd "$OUT/$name" && exec sipp -i "$ip" -ci "$ip" -cp "$cp" -mp "$mp" -nostdin \
    -trace_err -error_file errors.log -trace_stat -stf stat.csv -fd 10 "$@" \
    </dev/null >screen.log 2>stderr.log) &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

SERVERS=()
for k in 1 2 3; do
  sipp_run "server$k" "$NET.1$k" 8800 20000 -sf "$SCEN/uas.xml" -p 5080 -t u1
  SERVERS+=("$LAST_PID")
done
sleep 1
for pid in "${SERVERS[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "soak: a sipp server did not start (see $OUT/server*/)" >&2; exit 1; }; done

SECS=$((MINUTES * 60))
# client NAME IP SCENARIO RATE CALL_MS: RATE calls/s for SECS seconds, then it stops.
CLIENTS=()
CLIENT_NAMES=()
client() {
  local name=$1 ip=$2 scen=$3 rate=$4 ms=$5
  local calls=$((rate * SECS)) limit=$((rate * (ms / 1000 + 5) * 2))
  sipp_run "$name" "$ip" 8800 20000 -sf "$SCEN/$scen" -p 5070 -t u1 -r "$rate" -d "$ms" \
    -m "$calls" -l "$limit" "$PROXY_IP:5060"
  CLIENTS+=("$LAST_PID")
  CLIENT_NAMES+=("$name")
}
client calls_1s "$NET.21" uac.xml 15 1000
client calls_10s "$NET.22" uac.xml 6 10000
client calls_60s "$NET.23" uac.xml 2 60000
client no_bye "$NET.24" uac_no_bye.xml 1 0
log "load: 24 calls/s for $MINUTES min (1 s x15/s, 10 s x6/s, 60 s x2/s, no BYE x1/s); lifetime ${LIFETIME_S}s"

# ---- sampling ----------------------------------------------------------------------------------
SAMPLES="$OUT/samples.csv"
echo "elapsed_s,phase,rss_kb,active,early,processed,expired,failed,load_total,load_s1,load_s2,load_s3" >"$SAMPLES"
T0=$(date +%s)
sample() { # PHASE
  local rss stats dests
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$PROXY_PID/status")
  stats=$(curl -sf --max-time 5 "$ADMIN/v1/dialogs/stats") || return 0
  dests=$(curl -sf --max-time 5 "$ADMIN/v1/destinations") || return 0
  python3 - "$(($(date +%s) - T0))" "$1" "$rss" "$stats" "$dests" >>"$SAMPLES" <<'PY'
import json, sys
t, phase, rss, stats, dests = sys.argv[1:6]
s = json.loads(stats)
loads = {d["id"]: next((r["load"] for r in d["resources"] if r["name"] == "pstn"), 0)
         for d in json.loads(dests)["destinations"]}
print(",".join(str(x) for x in [t, phase, rss, s["active"], s["early"], s["processed"],
      s["expired"], s["failed"], sum(loads.values()), loads.get("s1", 0), loads.get("s2", 0),
      loads.get("s3", 0)]))
PY
}

clients_running() {
  local pid
  for pid in "${CLIENTS[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

next=$T0
while clients_running; do
  kill -0 "$PROXY_PID" 2>/dev/null || { echo "soak: the proxy died" >&2; tail -20 "$OUT/proxy.log" >&2; exit 1; }
  sample load
  if [ $(((next - T0) % 300)) -eq 0 ]; then
    log "$(tail -1 "$SAMPLES")"
  fi
  next=$((next + 10))
  sleep $((next - $(date +%s) > 0 ? next - $(date +%s) : 0))
  # Clients that outlive their last call by far are stuck: the wait below reports them.
  [ $(($(date +%s) - T0)) -lt $((SECS + 180)) ] || break
done
LOAD_END=$(($(date +%s) - T0))
log "clients done at ${LOAD_END}s; waiting ${LIFETIME_S}s + ${MARGIN_S}s for the last calls without BYE to expire"
until [ $(($(date +%s) - T0)) -ge $((LOAD_END + LIFETIME_S + MARGIN_S)) ]; do
  sleep 10
  sample drain
done
sample final

# Servers: graceful stop (SIGUSR1 writes the final statistics).
for pid in "${SERVERS[@]}"; do kill -USR1 "$pid" 2>/dev/null || true; done
for pid in "${SERVERS[@]}" "${CLIENTS[@]}"; do
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
curl -sf "$ADMIN/v1/destinations" >"$OUT/destinations.json"
curl -sf "$ADMIN/v1/dialogs/stats" >"$OUT/stats.json"
curl -sf "$ADMIN/metrics" >"$OUT/metrics.txt"

# ---- checks ------------------------------------------------------------------------------------
python3 - "$OUT" "$MINUTES" "$LIFETIME_S" "${CLIENT_NAMES[@]}" <<'PY'
import csv, json, os, sys
out, minutes, lifetime = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
clients = sys.argv[4:]
fails = []
def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        fails.append(what)

def last_row(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=";") if r]
    return dict(zip(rows[0], rows[-1])) if len(rows) >= 2 else {}

samples = list(csv.DictReader(open(os.path.join(out, "samples.csv"))))
for r in samples:
    for k in r:
        if k != "phase":
            r[k] = int(r[k])
final = samples[-1]
stats = json.load(open(os.path.join(out, "stats.json")))
dests = json.load(open(os.path.join(out, "destinations.json")))["destinations"]

created, no_bye = 0, 0
for c in clients:
    row = last_row(os.path.join(out, c, "stat.csv"))
    n, ok, bad = (int(row.get(k, -1)) for k in ("TotalCallCreated", "SuccessfulCall(C)", "FailedCall(C)"))
    created += n
    if c == "no_bye":
        no_bye = n
    check(n > 0 and ok == n and bad == 0, f"client {c}: {n} calls, {ok} successful, {bad} failed")
for k in (1, 2, 3):
    row = last_row(os.path.join(out, f"server{k}", "stat.csv"))
    check(int(row.get("FailedCall(C)", -1)) == 0,
          f"server{k}: {row.get('SuccessfulCall(C)')} successful (probes included), "
          f"{row.get('FailedCall(C)')} failed")

check(stats["active"] == 0 and stats["early"] == 0, f"no dialog open at the end: {stats}")
loads = {d["id"]: [r["load"] for r in d["resources"]] for d in dests}
check(all(l == 0 for ls in loads.values() for l in ls), f"every destination's load is 0: {loads}")
check(stats["processed"] == created, f"processed {stats['processed']} = calls made {created}")
check(stats["failed"] == 0, f"failed dialogs: {stats['failed']}")
check(stats["expired"] == no_bye, f"expired {stats['expired']} = calls without BYE {no_bye}")

load = [r for r in samples if r["phase"] == "load"]
# Steady state needs the longest call (60 s) and the lifetime of calls without BYE to pass.
warm = 300 if minutes >= 10 else lifetime + 60
after_warm = [r for r in load if r["elapsed_s"] >= warm]
if len(after_warm) >= 3:
    base = after_warm[0]["rss_kb"]
    end = sum(r["rss_kb"] for r in load[-3:]) / 3
    peak = max(r["rss_kb"] for r in load)
    growth = (end - base) / base
    check(growth <= 0.10,
          f"RSS flat: {base} KiB after {warm}s warm-up, {end:.0f} KiB at the end of the load "
          f"({growth:+.1%}), peak {peak} KiB")
    tail = [r for r in load if r["elapsed_s"] >= load[-1]["elapsed_s"] - 600]
    n = len(tail)
    xs = [r["elapsed_s"] / 60 for r in tail]
    ys = [r["rss_kb"] for r in tail]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    check(slope * 10 <= 0.01 * base,
          f"RSS slope over the last {xs[-1] - xs[0]:.0f} min of load: {slope:+.1f} KiB/min "
          f"({slope * 60 / base:+.2%} of the warm-up RSS per hour; at most 1 % per 10 min)")
    act = [r["active"] for r in after_warm]
    print(f"info active dialogs after warm-up: min {min(act)}, max {max(act)}, "
          f"mean {sum(act) / len(act):.0f}; RSS at the very end (idle) {final['rss_kb']} KiB")
else:
    check(False, f"too few samples after the {warm}s warm-up to judge RSS: run at least "
                 f"{(warm + 60) // 60 + 1} minutes")
print(f"soak: {len(fails)} check(s) failed" if fails else "soak: all checks passed")
sys.exit(1 if fails else 0)
PY
