#!/usr/bin/env bash
# End-to-end test of mrcp-lb: the Helm chart installed into a real Kubernetes control plane
# (tests/k8s: etcd, kube-apiserver, controller-manager, scheduler, kwok fake nodes), the real
# lb-proxy and lb-operator binaries, sipp as the UniMRCP servers and the client, a real
# Prometheus, and the chart's Grafana dashboard queries. Everything stays on loopback.
#
#   tests/e2e/run.sh
#
# What it does (see tests/e2e/README.md for the why):
#   1. helm lint; control plane (--full --nodes 2); helm install --wait; every rendered object
#      present; a DaemonSet/hostNetwork/watchNamespace rendering and one with the chart
#      conventions (OpenShift security contexts, digest, extra args/env, spread, operator PDB)
#      accepted by the API server (dry-run); helm upgrade to a chart copy whose CRD has a new
#      printer column: the API server serves it, the Deployments do not roll; the chart's
#      operator Deployment scaled to 0 (its pod is only simulated).
#   2. One real lb-proxy per chart proxy pod, bound to that pod's IP (kwok gives pods
#      127.1.x.y; the replicas share load over UDP :7070), with the chart's ConfigMap, args and env (token from the chart's Secret);
#      the real lb-operator runs locally with the chart's args, as the chart's ServiceAccount
#      (a TokenRequest token: the chart's RBAC is what it gets), and finds the proxies through
#      the chart's own label selector.
#   3. examples/unimrcp-statefulset.yaml + examples/mrcpserver.yaml in namespace speech, one sipp
#      server (tests/sipp/uas.xml) per pod on podIP:8060; scale 1 -> 3 -> 1 and time how fast
#      every proxy's GET /v1/destinations follows (scale-down: terminating pods are held by a
#      finalizer so that their draining state is observable, as with a real kubelet's grace
#      period, then released).
#   4. sipp client traffic (tests/sipp/uac.xml) through one proxy at 3 servers (all calls must
#      succeed and spread), and a burst through the other proxy while two servers drain (none
#      may reach them).
#   5. A bad capacity annotation must give a Warning Event (the chart's RBAC must allow it).
#      Prometheus (1 s scrapes; proxies found by the chart's prometheus.io pod annotations, with
#      the labels Kubernetes SD would give them, through file_sd; the operator statically) and
#      every PromQL expression of charts/mrcp-lb/dashboards/mrcp-lb.json: each must return
#      data; a few values are checked. Reported as warnings (fatal unless E2E_STRICT=0): series of
#      removed destinations left in a proxy's /metrics, dashboard counters that the traffic
#      did not move.
#   6. Loopback only: every destination address and every proxy the operator discovered is in
#      127.0.0.0/8; with tcpdump, a capture on "any" must hold no SIP/admin packet with an
#      endpoint outside loopback.
#   7. helm uninstall: the CRD and the MrcpServer stay (resource policy keep), nothing else of
#      the release.
#
# Environment:
#   LB_PROXY_BIN, LB_OPERATOR_BIN  use these binaries instead of `cargo build`
#   E2E_IP                          loopback address for the sipp client, the operator's
#                                   metrics and Prometheus (default 127.0.6.1)
#   E2E_CALLS, E2E_RATE             client calls and calls/s (default 75 at 5/s: 15 s)
#   E2E_STEP_TIMEOUT                seconds each scaling step may take to show (default 15)
#   E2E_DASHBOARD                   dashboard JSON whose queries are checked (default the chart's)
#   E2E_TCPDUMP=auto|1|0            capture with tcpdump: when available (default), required, off
#   E2E_STRICT=0                    report warnings (stale per-destination metrics, counters that
#                                   did not move) without failing; by default they fail the run
#   E2E_KEEP=1                      keep the work directory (it is always kept on failure)
set -Eeuo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

# shellcheck source=lib.sh
source "$ROOT/tests/e2e/lib.sh"

E2E_CALLS=${E2E_CALLS:-75}
E2E_RATE=${E2E_RATE:-5}
E2E_STEP_TIMEOUT=${E2E_STEP_TIMEOUT:-15}
E2E_TCPDUMP=${E2E_TCPDUMP:-auto}

# ---------------------------------------------------------------------------------------------
# 0. Tools, one run at a time, builds.

e2e_prepare

# ---------------------------------------------------------------------------------------------
# 1. Control plane, traffic capture, helm install.

e2e_control_plane

TCPDUMP_FILTER='port 5060 or port 7070 or port 8060 or port 8081'
# Any IPv4 packet with an endpoint outside 127.0.0.0/8, any IPv6 packet not ::1 to ::1. A
# superset of "not net 127.0.0.0/8 and not ip6" (which would miss a packet from a loopback
# address to the outside).
LEAK_FILTER='(ip and not (src net 127.0.0.0/8 and dst net 127.0.0.0/8)) or (ip6 and not (src host ::1 and dst host ::1))'
CAPTURING=false
if [ "$E2E_TCPDUMP" != 0 ]; then
	if command -v tcpdump >/dev/null; then
		mkdir -p "$WORK/tcpdump"
		start_bg tcpdump "$WORK/tcpdump" "$WORK/tcpdump/tcpdump.log" \
			tcpdump -i any -n -U -s 256 -Z root -w "$WORK/tcpdump/capture.pcap" "$TCPDUMP_FILTER"
		for ((i = 0; i < 50; i++)); do
			grep -q 'listening on' "$WORK/tcpdump/tcpdump.log" 2>/dev/null && break
			alive tcpdump || break
			sleep 0.1
		done
		if grep -q 'listening on' "$WORK/tcpdump/tcpdump.log" && alive tcpdump; then
			CAPTURING=true
			log "tcpdump capturing on any: $TCPDUMP_FILTER"
		else
			stop_bg tcpdump 2
			msg="tcpdump cannot capture here: $(head -3 "$WORK/tcpdump/tcpdump.log" | tr '\n' ' ')"
			[ "$E2E_TCPDUMP" = 1 ] && fail "$msg"
			note "$msg; packet capture skipped"
		fi
	else
		[ "$E2E_TCPDUMP" = 1 ] && fail "E2E_TCPDUMP=1 but tcpdump is not installed (apt-get install tcpdump)"
		note "tcpdump not installed: packet capture skipped (apt-get install tcpdump to enable)"
	fi
fi

# shellcheck disable=SC2119 # no extra helm arguments
e2e_helm_install

# The other shape of the chart, checked by the API server without being installed.
k create namespace "$APP_NS" >/dev/null
"$HELM" template variant charts/mrcp-lb -n "$NS" \
	--set proxy.kind=DaemonSet,proxy.hostNetwork=true,operator.watchNamespace="$APP_NS" \
	>"$WORK/variant.yaml" 2>"$WORK/variant.err" || {
	cat "$WORK/variant.err" >&2
	fail "helm template with proxy.kind=DaemonSet,proxy.hostNetwork=true,operator.watchNamespace=$APP_NS"
}
k apply --dry-run=server -f "$WORK/variant.yaml" >"$WORK/variant-apply.log" 2>&1 || {
	cat "$WORK/variant-apply.log" >&2
	fail "kube-apiserver rejects the DaemonSet/hostNetwork/watchNamespace rendering"
}
pass "DaemonSet + hostNetwork + watchNamespace rendering: $(grep -c '^kind:' "$WORK/variant.yaml") objects accepted (server dry-run)"

# The chart conventions (README, "Chart values") with every value set, and the OpenShift shape
# (no UID/GID/fsGroup): the API server must accept what they render (server dry-run).
"$HELM" template conventions charts/mrcp-lb -n "$NS" -f examples/openshift-values.yaml \
	--set crds.install=false,global.imageRegistry=registry.example.com,operator.replicas=2 \
	--set proxy.image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef \
	--set 'proxy.extraArgs={--log-level=lb_proxy=debug}',proxy.podLabels.team=voice,operator.podLabels.team=voice \
	--set-json 'proxy.extraEnv=[{"name":"RUST_BACKTRACE","value":"1"}]' \
	--set-json 'operator.topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"kubernetes.io/hostname","whenUnsatisfiable":"ScheduleAnyway"}]' \
	--set proxy.livenessProbe.initialDelaySeconds=5,operator.readinessProbe.timeoutSeconds=2 \
	>"$WORK/conventions.yaml" 2>"$WORK/conventions.err" || {
	cat "$WORK/conventions.err" >&2
	fail "helm template with the chart-convention values"
}
k apply --dry-run=server -f "$WORK/conventions.yaml" >"$WORK/conventions-apply.log" 2>&1 || {
	cat "$WORK/conventions-apply.log" >&2
	fail "kube-apiserver rejects the chart-convention rendering (OpenShift security contexts, digest, spread, operator PDB)"
}
pass "chart conventions (OpenShift security contexts, registry + digest, extra args/env, pod labels, spread, probes, operator PDB): $(grep -c '^kind:' "$WORK/conventions.yaml") objects accepted (server dry-run)"

# CRDs upgrade with the chart: helm upgrade to a copy whose CRD has one more printer column
# (as a new chart version would); the API server must serve it, keep the resource policy, and
# the workloads must not roll (same values, same pod templates).
cp -r charts/mrcp-lb "$WORK/chart-upgrade"
crd_copy=$WORK/chart-upgrade/files/crds/mrcpserver.yaml
awk '{ print } /^  - additionalPrinterColumns:$/ && !done {
	print "    - description: Added by the e2e helm upgrade"
	print "      jsonPath: .metadata.creationTimestamp"
	print "      name: E2EUpgrade"
	print "      type: date"
	done = 1 }' charts/mrcp-lb/files/crds/mrcpserver.yaml >"$crd_copy"
grep -q 'name: E2EUpgrade' "$crd_copy" || fail "could not add a printer column to the CRD copy"
gens_before=$(k -n "$NS" get deploy -o json | jq -c '[.items[] | {(.metadata.name): .metadata.generation}] | add')
t=$(ms)
"$HELM" upgrade "$RELEASE" "$WORK/chart-upgrade" -n "$NS" --wait --timeout 60s >"$WORK/helm-upgrade.log" 2>&1 || {
	cat "$WORK/helm-upgrade.log" >&2
	fail "helm upgrade $RELEASE to a chart whose CRD changed"
}
cols=$(k get crd mrcpservers.mrcp-lb.io -o json | jq -r '[.spec.versions[0].additionalPrinterColumns[].name] | join(",")')
[[ ",$cols," == *,E2EUpgrade,* ]] || fail "helm upgrade did not update the CRD: printer columns $cols"
[ "$(k get crd mrcpservers.mrcp-lb.io -o jsonpath='{.metadata.annotations.helm\.sh/resource-policy}')" = keep ] ||
	fail "the CRD has no helm.sh/resource-policy: keep"
k wait --for=condition=Established crd/mrcpservers.mrcp-lb.io --timeout=30s >/dev/null || fail "CRD not Established after the upgrade"
gens_after=$(k -n "$NS" get deploy -o json | jq -c '[.items[] | {(.metadata.name): .metadata.generation}] | add')
[ "$gens_before" = "$gens_after" ] || fail "helm upgrade with the same values changed the Deployments: $gens_before -> $gens_after"
TIMINGS+=("helm upgrade (CRD changed): $(secs $(($(ms) - t))) s")
pass "helm upgrade: the CRD got the new printer column ($cols), keeps helm.sh/resource-policy: keep; Deployments untouched ($gens_after)"

# ---------------------------------------------------------------------------------------------
# 2. Real proxies on the proxy pods' IPs, the real operator with the chart's args.

e2e_proxies_and_operator

# ---------------------------------------------------------------------------------------------
e2e_prometheus

# ---------------------------------------------------------------------------------------------
# 3. The MRCP servers: the example StatefulSet and MrcpServer; scale 1 -> 3 -> 1.

EXPECTED="" LAST_VIEWS="" PODS_OK_AT=""
converged() { # UP DRAINING: that many pods Ready / terminating, and every proxy shows exactly them
	local pods ip v n_up n_dr
	pods=$(k -n "$APP_NS" get pods -l app=unimrcp -o json) || return 1
	sync_uas "$pods"
	EXPECTED=$(jq -c '[.items[] | select((.status.podIP // "") != "") |
		{id: "\(.metadata.namespace)/\(.metadata.name)@\(.metadata.uid[0:8])",
		 state: (if .metadata.deletionTimestamp then "draining"
		         elif any(.status.conditions[]?; .type == "Ready" and .status == "True") then "up"
		         else "down" end),
		 resources: "pstn=100", removed: false}] | sort_by(.id)' <<<"$pods")
	n_up=$(jq '[.[] | select(.state == "up")] | length' <<<"$EXPECTED")
	n_dr=$(jq '[.[] | select(.state == "draining")] | length' <<<"$EXPECTED")
	[ "$(jq '.items | length' <<<"$pods")" = $(($1 + $2)) ] && [ "$n_up" = "$1" ] && [ "$n_dr" = "$2" ] || return 1
	[ -n "$PODS_OK_AT" ] || PODS_OK_AT=$(ms)
	LAST_VIEWS=""
	for ip in "${PROXY_IPS[@]}"; do
		v=$(proxy_json "$ip" | view_of) || return 1
		LAST_VIEWS+="$ip: $v"$'\n'
		[ "$v" = "$EXPECTED" ] || return 1
	done
}

wait_converged() { # LABEL UP DRAINING START_MS
	local label=$1 t0=$4 done_at ip
	PODS_OK_AT=""
	until converged "$2" "$3"; do
		if [ $(($(ms) - t0)) -gt $((E2E_STEP_TIMEOUT * 1000)) ]; then
			echo "expected (from the pods): $EXPECTED" >&2
			echo "proxies:" >&2
			for ip in "${PROXY_IPS[@]}"; do echo "  $ip: $(proxy_json "$ip" | view_of)" >&2; done
			k -n "$APP_NS" get pods -o wide >&2 || true
			fail "$label: the proxies did not follow within ${E2E_STEP_TIMEOUT}s"
		fi
		sleep 0.1
	done
	done_at=$(ms)
	for ip in "${PROXY_IPS[@]}"; do check_loopback "$ip"; done
	TIMINGS+=("$(printf '%-44s pods %6ss, every proxy %6ss' "$label:" "$(secs $((PODS_OK_AT - t0)))" "$(secs $((done_at - t0)))")")
	pass "$label: every proxy shows $(jq -r 'map("\(.id | sub("^[^/]*/"; ""))=\(.state)") | join(" ")' <<<"$EXPECTED") (pstn=100) after $(secs $((done_at - t0))) s"
}

mrcp_status_is() { # READY: the MrcpServer's status counts READY ready destinations, Ready=True when > 0
	local s
	s=$(k -n "$APP_NS" get mrcpserver unimrcp -o json | jq -c '.status // {}') || return 1
	[ "$(jq '.readyDestinations // -1' <<<"$s")" = "$1" ] || return 1
	[ "$1" = 0 ] || [ "$(jq -r '.conditions[]? | select(.type == "Ready") | .status' <<<"$s")" = True ]
}
wait_mrcp_status() { # READY START_MS
	local i
	for ((i = 0; ; i++)); do
		mrcp_status_is "$1" && break
		[ "$i" -lt 100 ] || fail "MrcpServer $APP_NS/unimrcp status: $(k -n "$APP_NS" get mrcpserver unimrcp -o jsonpath='{.status}'), want readyDestinations=$1"
		sleep 0.1
	done
	log "MrcpServer status after $(secs $(($(ms) - $2))) s: $(k -n "$APP_NS" get mrcpserver unimrcp --no-headers | tr -s ' ')"
}

t=$(ms)
k -n "$APP_NS" apply -f examples/unimrcp-statefulset.yaml -f examples/mrcpserver.yaml >/dev/null
wait_converged "apply StatefulSet (1 replica) + MrcpServer" 1 0 "$t"
wait_mrcp_status 1 "$t"

t=$(ms)
k -n "$APP_NS" scale statefulset unimrcp --replicas=3 >/dev/null
wait_converged "scale 1 -> 3" 3 0 "$t"
wait_mrcp_status 3 "$t"

# ---------------------------------------------------------------------------------------------
# 4. Traffic through one proxy while three servers are up.

PA=${PROXY_IPS[0]} PB=${PROXY_IPS[1]:-${PROXY_IPS[0]}}
t=$(ms)
log "traffic: $E2E_CALLS calls at $E2E_RATE/s (1 s each) through proxy $PA:5060"
run_client client-main "$PA" "$E2E_CALLS" "$E2E_RATE" 1000
for ((i = 0; ; i++)); do
	active=$(hcurl "http://$PA:$PROXY_ADMIN_PORT/v1/dialogs/stats" | jq .active)
	[ "$active" = 0 ] && break
	[ "$i" -lt 50 ] || fail "proxy $PA still has $active active dialogs 5 s after the client ended"
	sleep 0.1
done
stats=$(hcurl "http://$PA:$PROXY_ADMIN_PORT/v1/dialogs/stats")
spread=$(proxy_json "$PA" | jq -r '[.destinations[] | "\(.id | sub("^[^/]*/"; ""))=\(.calls)"] | join(" ")')
total=$(proxy_json "$PA" | jq '[.destinations[].calls] | add')
[ "$total" = "$E2E_CALLS" ] || fail "proxy $PA routed $total calls, want $E2E_CALLS: $spread"
proxy_json "$PA" | jq -e '[.destinations[].calls] | all(. > 0)' >/dev/null || fail "calls did not reach every server: $spread"
[ "$(jq .failed <<<"$stats")" = 0 ] || fail "proxy $PA counts failed dialogs: $stats"
for ip in "${PROXY_IPS[@]}"; do
	# Every server answered OPTIONS probes from every proxy.
	proxy_json "$ip" | jq -e '[.destinations[].probe | .succeeded > 0 and .lastCode == 200] | all' >/dev/null ||
		fail "proxy $ip: not every destination answers its OPTIONS probes: $(proxy_json "$ip" | jq -c '[.destinations[] | {id, probe}]')"
done
# The replicas share load: each sees every other proxy live, and PB heard PA's load updates.
for ip in "${PROXY_IPS[@]}"; do
	size=$(hcurl "http://$ip:$PROXY_ADMIN_PORT/v1/cluster" | jq .size)
	[ "$size" = "${#PROXY_IPS[@]}" ] ||
		fail "proxy $ip sees $size live replicas, want ${#PROXY_IPS[@]}: $(hcurl "http://$ip:$PROXY_ADMIN_PORT/v1/cluster" | jq -c .)"
done
received=$(hcurl "http://$PB:$PROXY_ADMIN_PORT/metrics" | awk '/^mrcp_lb_cluster_updates_total\{direction="received"\}/ {print $2}')
[ "${#PROXY_IPS[@]}" = 1 ] || [ "${received:-0}" != 0 ] || fail "proxy $PB received no load update from its peers"
TIMINGS+=("traffic: $E2E_CALLS calls through $PA: $(secs $(($(ms) - t))) s")
pass "$E2E_CALLS/$E2E_CALLS calls through $PA succeeded, spread $spread; dialogs $(jq -c . <<<"$stats"); every server answers every proxy's probes; ${#PROXY_IPS[@]} replicas share load (${received:-0} updates received by $PB)"

# ---------------------------------------------------------------------------------------------
# Scale 3 -> 1. kwok deletes a terminating pod at once; a finalizer holds unimrcp-1 and -2 the
# way a real kubelet's grace period would, so their draining state is seen, then lets them go.

for p in unimrcp-1 unimrcp-2; do
	k -n "$APP_NS" patch pod "$p" --type=merge -p "{\"metadata\":{\"finalizers\":[\"$HOLD_FINALIZER\"]}}" >/dev/null
done
t=$(ms)
k -n "$APP_NS" scale statefulset unimrcp --replicas=1 >/dev/null
wait_converged "scale 3 -> 1: terminating pods draining" 1 2 "$t"
wait_mrcp_status 1 "$t"

# New calls go only to the server that stays, through the other proxy this time.
before=$(proxy_json "$PB" | jq -c '[.destinations[] | {id, calls, state}]')
run_client client-drain "$PB" 10 10 200
after=$(proxy_json "$PB" | jq -c '[.destinations[] | {id, calls, state}]')
jq -e --argjson b "$before" '
	(map({key: .id, value: .}) | from_entries) as $a |
	all($b[]; if .state == "draining" then $a[.id].calls == .calls else $a[.id].calls == .calls + 10 end)' <<<"$after" >/dev/null ||
	fail "calls during the drain: before $before, after $after (draining servers must get none)"
pass "10/10 calls through $PB during the drain all went to unimrcp-0; the draining servers got none"

t=$(ms)
for p in unimrcp-1 unimrcp-2; do
	k -n "$APP_NS" patch pod "$p" --type=json -p '[{"op":"remove","path":"/metadata/finalizers"}]' >/dev/null
done
wait_converged "scale 3 -> 1: terminated pods gone" 1 0 "$t"
[ "${#SIPP_IP[@]}" = 1 ] || fail "sipp servers still running for: ${!SIPP_IP[*]}"

# Per-destination series of removed destinations must leave the proxies' /metrics too.
for ip in "${PROXY_IPS[@]}"; do
	ids=$(proxy_json "$ip" | jq -r '.destinations[].id' | sort -u)
	hcurl "http://$ip:$PROXY_ADMIN_PORT/metrics" >"$WORK/metrics-$ip.txt"
	stale=$(grep -o 'destination="[^"]*"' "$WORK/metrics-$ip.txt" | sed 's/^destination="//; s/"$//' | sort -u | comm -23 - <(echo "$ids") || true)
	if [ -n "$stale" ]; then
		lines=$(grep -F -f <(sed 's/.*/destination="&"/' <<<"$stale") "$WORK/metrics-$ip.txt")
		families=$(sed 's/[{ ].*//' <<<"$lines" | sort -u | paste -sd' ')
		warn "proxy $ip /metrics still exports $(wc -l <<<"$lines") series of the removed destinations $(paste -sd' ' <<<"$stale") ($families), e.g. $(head -1 <<<"$lines")"
	fi
done

# A bad capacity annotation: the operator falls back to defaultResources (pstn=100 here, so
# nothing changes in the proxies) and records a Warning Event, which the chart's RBAC must allow.
t=$(ms)
k -n "$APP_NS" annotate pod unimrcp-0 --overwrite mrcp-lb.io/pstn-capacity=lots >/dev/null
for ((i = 0; ; i++)); do
	ev=$(k -n "$APP_NS" get events.events.k8s.io -o json |
		jq -c '[.items[] | select(.reason == "InvalidCapacityAnnotation" and .regarding.name == "unimrcp-0")] | first // empty')
	[ -n "$ev" ] && break
	[ "$i" -lt 100 ] || fail "no InvalidCapacityAnnotation Event for pod unimrcp-0 10 s after a bad annotation (operator: $(grep -i event "$WORK/operator/operator.log" | tail -3))"
	sleep 0.1
done
[ "$(jq -r .type <<<"$ev")" = Warning ] || fail "the InvalidCapacityAnnotation Event is not a Warning: $ev"
converged 1 0 || fail "a bad annotation changed the proxies' view: $LAST_VIEWS"
pass "bad annotation mrcp-lb.io/pstn-capacity=lots: Warning Event by $(jq -r '.reportingController // "?"' <<<"$ev") after $(secs $(($(ms) - t))) s (\"$(jq -r .note <<<"$ev")\"), proxies unchanged"

# ---------------------------------------------------------------------------------------------
# 5. Prometheus: targets, then every dashboard query.

promq() { hcurl -G "$PROM/api/v1/query" --data-urlencode "query=$1"; }

for ((i = 0; ; i++)); do
	targets=$(hcurl "$PROM/api/v1/targets?state=active")
	n_up=$(jq '[.data.activeTargets[] | select(.health == "up")] | length' <<<"$targets")
	[ "$n_up" = $((${#PROXY_IPS[@]} + 1)) ] && break
	[ "$i" -lt 100 ] || fail "Prometheus targets: $(jq -c '[.data.activeTargets[] | {scrapeUrl, health, lastError}]' <<<"$targets")"
	sleep 0.1
done
got=$(jq -r '.data.activeTargets[] | select(.labels.job == "kubernetes-pods") | .labels.instance' <<<"$targets" | sort)
want=$(for ip in "${PROXY_IPS[@]}"; do echo "$ip:$PROXY_ADMIN_PORT"; done | sort)
[ "$got" = "$want" ] || fail "Prometheus found by the pod annotations: $(echo "$got" | tr '\n' ' '), want the proxies $(echo "$want" | tr '\n' ' ')"
pass "Prometheus scrapes the proxies found by the chart's prometheus.io annotations ($(paste -sd' ' <<<"$got")) and the operator; all up"
sleep 3 # a few scrapes after the last change

DASH=${E2E_DASHBOARD:-charts/mrcp-lb/dashboards/mrcp-lb.json}
mapfile -t QUERIES < <(jq -r '[.. | objects | select(has("targets")) | .title as $t | .targets[]? | select(.expr != null and .expr != "") |
	[$t, .expr] | @base64] | .[]' "$DASH" 2>/dev/null || fail "cannot read $DASH")
[ "${#QUERIES[@]}" -gt 0 ] || fail "no PromQL expression found in $DASH"
empty=()
QUERY_TABLE=()
for q in "${QUERIES[@]}"; do
	title=$(base64 -d <<<"$q" | jq -r '.[0]')
	expr=$(base64 -d <<<"$q" | jq -r '.[1]')
	# Grafana's interval variables, should a query use them.
	e=${expr//'$__rate_interval'/1m}
	e=${e//'$__interval'/1s}
	e=${e//'$__range'/5m}
	# The dashboard's template variables (a repeated panel's $resource): every value.
	e=${e//'$resource'/.+}
	res=$(promq "$e") || fail "Prometheus rejected the query of panel \"$title\": $expr"
	[ "$(jq -r .status <<<"$res")" = success ] || fail "query of panel \"$title\" failed: $(jq -c . <<<"$res")"
	n=$(jq '.data.result | length' <<<"$res")
	real=$(jq '[.data.result[] | .value[1] | select(. != "NaN")] | length' <<<"$res")
	vals=$(jq -r '[.data.result[] |
		((.metric | del(.__name__) | [.[]] | join("/")) as $l |
		 (.value[1] | if . == "NaN" then . else (tonumber * 1000 | round / 1000 | tostring) end) as $v |
		 if $l == "" then $v else "\($l | sub("^[^/]*/"; ""))=\($v)" end)] | sort | .[0:6] | join(", ")' <<<"$res")
	QUERY_TABLE+=("$(printf '%3s series  %-38s %s   [%s]' "$n" "\"$title\"" "$expr" "$vals")")
	if [ "$n" = 0 ]; then
		empty+=("\"$title\": $expr (no series)")
	elif [ "$real" = 0 ]; then
		empty+=("\"$title\": $expr ($n series, only NaN)")
	fi
done
echo
echo "Dashboard queries ($DASH) against Prometheus:"
printf '  %s\n' "${QUERY_TABLE[@]}"
if [ ${#empty[@]} -gt 0 ]; then
	printf '  EMPTY: %s\n' "${empty[@]}" >&2
	fail "${#empty[@]} dashboard quer$([ ${#empty[@]} = 1 ] && echo y || echo ies) returned no data: ${empty[*]}"
fi
pass "all ${#QUERIES[@]} dashboard queries return data"

# A few values the run determines.
value_is() { # EXPR WANT
	local v
	v=$(promq "$1" | jq -r '.data.result[0].value[1] // "none"')
	[ "$v" = "$2" ] || fail "PromQL $1 = $v, want $2"
}
value_is 'count(max by (destination) (mrcp_lb_destination_state{state="up"}) == 1)' 1
value_is 'sum(mrcp_lb_calls_routed_total)' $((E2E_CALLS + 10))
value_is 'sum(mrcp_lb_dialogs_active)' 0
value_is 'sum(mrcp_lb_operator_proxies_in_sync)' "${#PROXY_IPS[@]}"
value_is 'sum(mrcp_lb_operator_proxies)' "${#PROXY_IPS[@]}"
value_is 'sum(mrcp_lb_operator_errors_total) or vector(0)' 0
value_is 'sum(mrcp_lb_operator_leader)' 1
# The operator's per-MrcpServer series (a static target: `namespace` is the MrcpServer's).
value_is "max(mrcp_lb_server_utilization{namespace=\"$APP_NS\",mrcpserver=\"unimrcp\",resource=\"pstn\"})" 0
value_is "sum(mrcp_lb_server_destinations{namespace=\"$APP_NS\",mrcpserver=\"unimrcp\",state=\"ready\"})" 1
# The traffic of this run must show in the counters the dashboard plots.
moved=0
unmoved=()
for m in \
	'mrcp_lb_sip_requests_received_total{method="INVITE"}' \
	'mrcp_lb_sip_requests_received_total{method="ACK"}' \
	'mrcp_lb_sip_requests_received_total{method="BYE"}' \
	'mrcp_lb_sip_responses_sent_total' \
	'mrcp_lb_dialogs_processed_total' \
	'mrcp_lb_calls_routed_total' \
	'mrcp_lb_invite_setup_seconds_count' \
	'mrcp_lb_destination_probes_total{result="success"}' \
	'mrcp_lb_operator_pushes_total{result="ok"}'; do
	v=$(promq "sum(increase(${m}[5m]))" | jq -r '.data.result[0].value[1] // "none"')
	if [ "$v" = none ] || ! jq -ne --arg v "$v" '$v | tonumber > 0' >/dev/null 2>&1; then
		unmoved+=("$m")
	else
		moved=$((moved + 1))
	fi
done
[ ${#unmoved[@]} = 0 ] ||
	warn "counters that did not move with this run's traffic (sum(increase(X[5m])) = 0; their dashboard panels stay at 0): ${unmoved[*]}"
pass "$moved of 9 SIP/dialog/probe/push counters moved with the traffic"
pass "Prometheus values: 1 destination up, $((E2E_CALLS + 10)) calls routed, 0 active dialogs, ${#PROXY_IPS[@]} proxies in sync, operator leads with 0 errors, MrcpServer $APP_NS/unimrcp 1 ready at utilization 0"

# ---------------------------------------------------------------------------------------------
# 6. Loopback only.

for ip in "${PROXY_IPS[@]}"; do check_loopback "$ip"; done
found=$(operator_proxies)
[ "$found" = "$(for ip in "${PROXY_IPS[@]}"; do echo "http://$ip:$PROXY_ADMIN_PORT"; done | sort -u)" ] ||
	fail "operator's proxies changed during the run: $found"
pass "loopback: $LOOPBACK_CHECKED destination URIs/addresses seen by the proxies and $(wc -l <<<"$found") operator-discovered proxies, all in 127.0.0.0/8"

if $CAPTURING; then
	stop_bg tcpdump 5
	total=$(tcpdump -r "$WORK/tcpdump/capture.pcap" -n 2>/dev/null | wc -l)
	to_pods=$(tcpdump -r "$WORK/tcpdump/capture.pcap" -n 'dst net 127.1.0.0/16' 2>/dev/null | wc -l)
	tcpdump -r "$WORK/tcpdump/capture.pcap" -n "$LEAK_FILTER" >"$WORK/tcpdump/leaks.txt" 2>/dev/null || true
	leaks=$(wc -l <"$WORK/tcpdump/leaks.txt")
	[ "$to_pods" -gt 0 ] || fail "tcpdump captured no packet to the pod addresses: the capture does not work"
	[ "$leaks" = 0 ] || fail "$leaks SIP/admin packets left loopback: $(head -5 "$WORK/tcpdump/leaks.txt")"
	pass "tcpdump on any ($TCPDUMP_FILTER): $total packets, $to_pods to pod IPs, 0 with an endpoint outside loopback"
fi

# ---------------------------------------------------------------------------------------------
# 7. helm uninstall: the CRD (and so the MrcpServers) stays (resource policy keep); everything
# else of the release goes.

t=$(ms)
"$HELM" uninstall "$RELEASE" -n "$NS" --wait --timeout 60s >"$WORK/helm-uninstall.log" 2>&1 || {
	cat "$WORK/helm-uninstall.log" >&2
	fail "helm uninstall $RELEASE"
}
grep -A1 'kept due to the resource policy' "$WORK/helm-uninstall.log" | grep -q 'mrcpservers.mrcp-lb.io' ||
	fail "helm uninstall did not report the CRD as kept: $(cat "$WORK/helm-uninstall.log")"
k get crd mrcpservers.mrcp-lb.io >/dev/null 2>&1 || fail "helm uninstall deleted the CRD"
k -n "$APP_NS" get mrcpserver unimrcp >/dev/null 2>&1 || fail "helm uninstall deleted MrcpServer $APP_NS/unimrcp"
left=$(KUBECONFIG=$WORK/kubeconfig-release k get -f "$WORK/manifest.yaml" -o name --ignore-not-found 2>/dev/null | sort | tr '\n' ' ')
[ "$left" = "customresourcedefinition.apiextensions.k8s.io/mrcpservers.mrcp-lb.io " ] ||
	fail "after helm uninstall, left of the release: $left"
TIMINGS+=("helm uninstall: $(secs $(($(ms) - t))) s")
pass "helm uninstall: only the CRD is left (kept), MrcpServer $APP_NS/unimrcp intact"

# ---------------------------------------------------------------------------------------------
# 8. Summary.

if [ ${#WARNINGS[@]} -gt 0 ] && [ "${E2E_STRICT:-1}" = 1 ]; then
	fail "${#WARNINGS[@]} warning(s) (E2E_STRICT=0 reports them without failing): ${WARNINGS[*]}"
fi
FAILED=0
echo
echo "================ mrcp-lb e2e: PASSED in $(secs "$(ms)") s$([ ${#WARNINGS[@]} = 0 ] || echo " with ${#WARNINGS[@]} warning(s)") ================"
echo "Timings:"
printf '  %s\n' "${TIMINGS[@]}"
echo "Checks:"
printf '  %s\n' "${SUMMARY[@]}"
