#!/usr/bin/env bash
# Checks every scenario pair sipp-to-sipp, without the proxy (no Record-Route, no failover).
# Uses only 127.0.9.1 (override with SELFTEST_IP). Each pair must end with all calls successful.
#   bash tests/sipp/selftest.sh
set -u
DIR="$(cd "$(dirname "$0")" && pwd)"
IP="${SELFTEST_IP:-127.0.9.1}"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT

fails=0
# scenario NAME -> sipp arguments ("-sn uac" for sipp's built-in uac, absolute paths as they are)
scen() {
  case "$1" in
    builtin:*) echo "-sn ${1#builtin:}" ;;
    /*) echo "-sf $1" ;;
    *) echo "-sf $DIR/$1" ;;
  esac
}

# run_pair NAME UAS_XML UAS_TRANSPORT UAC_XML UAC_ARGS...
run_pair() {
  local name="$1" uas="$2" uas_t="$3" uac="$4"; shift 4
  local d="$WORK/$name"; mkdir -p "$d/uas" "$d/uac"
  # shellcheck disable=SC2046
  (cd "$d/uas" && exec sipp $(scen "$uas") -t "$uas_t" -i "$IP" -p 5080 -nostdin -trace_err -trace_counts \
      -ci "$IP" -cp 8891 -mp 6100 -d 300 </dev/null >"$d/uas/out" 2>&1) &
  local uas_pid=$!; PIDS+=("$uas_pid")
  sleep 0.3
  # shellcheck disable=SC2046
  (cd "$d/uac" && exec sipp $(scen "$uac") -i "$IP" -p 5070 -nostdin -trace_err -trace_stat \
      -stf stat.csv -ci "$IP" -cp 8892 -mp 6200 -timeout 20s -timeout_error "$@" "$IP:5080" \
      </dev/null >"$d/uac/out" 2>&1)
  local rc=$?
  kill -USR1 "$uas_pid" 2>/dev/null; wait "$uas_pid" 2>/dev/null
  local uas_err; uas_err=$(cat "$d"/uas/*_errors.log 2>/dev/null | grep -c . || true)
  if [ "$rc" -eq 0 ] && [ "$uas_err" -eq 0 ]; then
    echo "ok   $name"
  else
    echo "FAIL $name (client rc=$rc, server error lines=$uas_err)"
    cat "$d"/uac/*_errors.log "$d"/uas/*_errors.log 2>/dev/null | head -40; echo
    fails=$((fails + 1))
  fi
}

# an out-of-dialog OPTIONS probe, as the balancer sends, must get 200 from every server scenario
cat >"$WORK/options.xml" <<'XML'
<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="options probe">
  <send retrans="500"><![CDATA[

      OPTIONS sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:probe@[local_ip]:[local_port]>;tag=[pid]P[call_number]
      To: <sip:[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 OPTIONS
      Max-Forwards: 70
      Content-Length: 0

  ]]></send>
  <recv response="200"/>
</scenario>
XML

run_pair uac-uas            uas.xml            u1 uac.xml                 -m 4 -r 10 -d 200
run_pair uac-uas-tcp        uas.xml            t1 uac.xml                 -m 4 -r 10 -d 200 -t t1
run_pair builtin-uac-uas    uas.xml            u1 builtin:uac             -m 4 -r 10 -d 200
run_pair uac-uas_expect_bye uas_expect_bye.xml u1 uac.xml                 -m 4 -r 10 -d 200
run_pair uac_long-uas_bye   uas_bye.xml        u1 uac_long_expect_bye.xml -m 4 -r 10
run_pair uac503-uas_503     uas_503.xml        u1 uac_expect_503.xml      -m 4 -r 10
run_pair uac486-uas_486     uas_486.xml        u1 uac_expect_486.xml      -m 4 -r 10
run_pair cancel-ringing     uas_ringing.xml    u1 uac_cancel.xml          -m 4 -r 10 -d 300
run_pair uac-uas_slow       uas_slow.xml       u1 uac.xml                 -m 4 -r 10 -d 300
run_pair uac-uas_slow_bye   uas_slow_bye.xml   u1 uac.xml                 -m 4 -r 10 -d 200
run_pair 200or503-uas       uas.xml            u1 uac_200_or_503.xml      -m 4 -r 10 -d 200
run_pair 200or503-uas_503   uas_503.xml        u1 uac_200_or_503.xml      -m 4 -r 10
run_pair reinvite           uas_reinvite.xml   u1 uac_reinvite.xml        -m 4 -r 10 -d 300
run_pair synth              uas_synth.xml      u1 uac_synth.xml           -m 4 -r 10 -d 200
run_pair recog              uas.xml            u1 uac_recog.xml           -m 4 -r 10 -d 200
run_pair synth_recog        uas_synth_recog.xml u1 uac_synth_recog.xml    -m 4 -r 10 -d 200
run_pair reject_recog       uas_reject_recog.xml u1 uac_synth_recog.xml   -m 4 -r 10 -d 200
run_pair reinvite_channels  uas_reinvite_channels.xml u1 uac_reinvite_channels.xml -m 2 -r 10 -d 200
for s in uas.xml uas_bye.xml uas_expect_bye.xml uas_503.xml uas_486.xml uas_ringing.xml \
  uas_reinvite.xml uas_slow.xml uas_slow_bye.xml uas_synth.xml uas_synth_recog.xml \
  uas_reject_recog.xml uas_reinvite_channels.xml uas_406.xml; do
  run_pair "options-$s" "$s" u1 "$WORK/options.xml" -m 2 -r 10
done

echo "selftest: $fails failed"
[ "$fails" -eq 0 ]
