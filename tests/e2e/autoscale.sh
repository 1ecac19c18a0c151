#!/usr/bin/env bash
# Autoscaling end to end: the UniMRCP StatefulSet scaled up and down on its live utilization by
# the real KEDA (operator + metrics adapter, registered through the API aggregation layer), the
# real HPA controller of kube-controller-manager and the real Prometheus, with the real lb-proxy
# replicas and lb-operator of tests/e2e/run.sh and sipp as UniMRCP servers and clients. Zero
# failed calls through the whole cycle. Everything stays on loopback.
#
#   tests/e2e/autoscale.sh            (make autoscale)
#
# The cycle (see tests/e2e/README.md, "Autoscaling"):
#   setup  control plane (--full: aggregation layer, HPA sync 2 s), KEDA's CRDs, the chart with
#          autoscaling.keda.enabled (its ScaledObject in namespace speech, a Prometheus trigger,
#          metricType Value, target AS_TARGET), proxies + operator + Prometheus as run.sh has
#          them, the example StatefulSet (1 replica, capacity AS_CAPACITY each) and MrcpServer,
#          then KEDA: its Service gets a 127.2.x.y ClusterIP, the adapter listens on exactly
#          that address (no kube-proxy: the aggregator dials the ClusterIP), an APIService
#          v1beta1.external.metrics.k8s.io with the test CA.
#   up     AS_LOAD_CALLS calls held AS_LOAD_HOLD s through one proxy: utilization
#          AS_LOAD_CALLS/AS_CAPACITY > AS_TARGET -> KEDA/HPA scale to 2 -> unimrcp-1 Ready ->
#          registered in both proxies -> AS_TAIL_CALLS calls held AS_TAIL_HOLD s through the
#          other proxy must all land on unimrcp-1 (least loaded).
#   down   the first calls end: utilization AS_TAIL_CALLS/(2*AS_CAPACITY) -> scale to 1 ->
#          unimrcp-1, which still has the tail calls, terminates: the kubelet's part is played
#          here (kwok deletes at once): a finalizer holds every UniMRCP pod from the moment it
#          appears; on its deletionTimestamp the preStop command of
#          examples/unimrcp-statefulset.yaml runs (curl .../wait-drained, the admin Service's
#          name replaced by a proxy pod IP); when it returns the finalizer goes, then the pod's
#          sipp server. The hook must return 200 after the tail calls ended, the pod must go.
#   Fails if the scale-up or the scale-down does not happen within AS_TIMEOUT s each, if a call
#   fails (sipp clients, proxies' dialog stats), or if the drain hook fails. Prints the times.
#
# Environment (besides run.sh's LB_PROXY_BIN, LB_OPERATOR_BIN, E2E_IP, E2E_KEEP):
#   AS_CAPACITY (10) AS_TARGET (0.6) AS_LOAD_CALLS (8) AS_LOAD_HOLD (25) AS_TAIL_CALLS (4)
#   AS_TAIL_HOLD (45) AS_TIMEOUT (90)
set -Eeuo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

# shellcheck source=lib.sh
source "$ROOT/tests/e2e/lib.sh"

AS_CAPACITY=${AS_CAPACITY:-10}
AS_TARGET=${AS_TARGET:-0.6}
AS_LOAD_CALLS=${AS_LOAD_CALLS:-8}
AS_LOAD_HOLD=${AS_LOAD_HOLD:-25}
AS_TAIL_CALLS=${AS_TAIL_CALLS:-4}
AS_TAIL_HOLD=${AS_TAIL_HOLD:-45}
AS_TIMEOUT=${AS_TIMEOUT:-90}
KEDA_NS=keda
ADAPTER_SVC=keda-metrics-apiserver
ADAPTER_PORT=6443 # the Service's port = the port the adapter listens on (nothing translates)
SO=unimrcp        # the ScaledObject the chart makes (named after the MrcpServer)
HPA=keda-hpa-$SO  # the HPA KEDA makes for it
# The operator reads the proxies' loads every second (the chart's default: 5 s).
E2E_OPERATOR_ARGS=(--load-interval-seconds=1)

# The operator's per-MrcpServer utilization gauge; the trigger's query (the chart's default)
# is built on it.
UTIL_Q="max(mrcp_lb_server_utilization{namespace=\"$APP_NS\",mrcpserver=\"unimrcp\",resource=\"pstn\"})"

e2e_prepare
for b in "$KEDA_OPERATOR" "$KEDA_ADAPTER" "$KEDA_CRDS"; do
	[ -e "$b" ] || fail "$b missing (tests/k8s/build.sh keda-operator keda-adapter)"
done
E2E_LOGS=("$WORK/keda/operator.log" "$WORK/keda/adapter.log")

e2e_control_plane

# KEDA's CRDs before the chart, whose ScaledObject needs them; the ScaledObject lives in the
# StatefulSet's namespace, which must exist first.
k create -f "$KEDA_CRDS" >"$WORK/keda-crds.log" 2>&1 || {
	cat "$WORK/keda-crds.log" >&2
	fail "KEDA CRDs ($KEDA_CRDS) rejected"
}
for ((i = 0; ; i++)); do
	[ "$(k get crd scaledobjects.keda.sh -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>/dev/null)" = True ] && break
	[ "$i" -lt 150 ] || fail "CRD scaledobjects.keda.sh not Established after 30 s"
	sleep 0.2
done
k create namespace "$APP_NS" >/dev/null

# kubectl prints one JSON object per document (or a List).
example_objects() { k create --dry-run=client -o json -f "$1" | jq -s '[.[] | if .kind == "List" then .items[] else . end | del(.metadata.namespace)]'; }

PROM_PORT=$(free_port)
e2e_helm_install \
	--set autoscaling.keda.enabled=true \
	--set autoscaling.keda.namespace="$APP_NS" \
	--set autoscaling.keda.mrcpServer=unimrcp \
	--set autoscaling.keda.resource=pstn \
	--set autoscaling.keda.maxReplicaCount=3 \
	--set autoscaling.keda.targetUtilization="$AS_TARGET" \
	--set autoscaling.keda.pollingInterval=2 \
	--set autoscaling.keda.prometheus.serverAddress="http://$E2E_IP:$PROM_PORT" \
	--set autoscaling.keda.behavior.scaleDown.stabilizationWindowSeconds=10
SO_JSON=$(k -n "$APP_NS" get scaledobject "$SO" -o json) || fail "the chart made no ScaledObject $APP_NS/$SO"
QUERY=$(jq -r '.spec.triggers[0].metadata.query' <<<"$SO_JSON")
[[ $QUERY == "$UTIL_Q * "* ]] || fail "the chart's ScaledObject queries $QUERY, not $UTIL_Q (scaled)"
# examples/keda-scaledobject.yaml: accepted by the API server (KEDA's CRD schema), and the same
# query as the chart's.
k -n "$APP_NS" apply --dry-run=server -f examples/keda-scaledobject.yaml >"$WORK/example-so.log" 2>&1 || {
	cat "$WORK/example-so.log" >&2
	fail "examples/keda-scaledobject.yaml rejected (server dry-run)"
}
[ "$(example_objects examples/keda-scaledobject.yaml | jq -r '.[0].spec.triggers[0].metadata.query')" = "$QUERY" ] ||
	fail "examples/keda-scaledobject.yaml's query differs from the chart's: $QUERY"
pass "the chart's ScaledObject $APP_NS/$SO: $(jq -c '{target: .spec.scaleTargetRef.name, min: .spec.minReplicaCount, max: .spec.maxReplicaCount, trigger: .spec.triggers[0] | {type, metricType, threshold: .metadata.threshold}}' <<<"$SO_JSON")"

e2e_proxies_and_operator
e2e_prometheus
promq() { hcurl -G "$PROM/api/v1/query" --data-urlencode "query=$1"; }
promv() { promq "$1" | jq -r '.data.result[0].value[1] // "none"'; }

# ---------------------------------------------------------------------------------------------
# The UniMRCP pods' lifecycle as a kubelet would run it. kwok marks pods Running/Ready and
# deletes terminating ones at once; this holds each with a finalizer from the moment it
# appears, runs a sipp server on its IP, and on deletion runs the example's preStop command
# before letting it go.

PRESTOP_CMD=$(example_objects examples/unimrcp-statefulset.yaml |
	jq -er '.[] | select(.kind == "StatefulSet") | .spec.template.spec.containers[0].lifecycle.preStop.exec.command | @json') ||
	fail "examples/unimrcp-statefulset.yaml has no preStop exec command"
ADMIN_SVC_HOST=$RELEASE-proxy-admin.$NS.svc
grep -qF "$ADMIN_SVC_HOST:$PROXY_ADMIN_PORT" <<<"$PRESTOP_CMD" ||
	fail "the example's preStop command does not call $ADMIN_SVC_HOST:$PROXY_ADMIN_PORT: $PRESTOP_CMD"
declare -A PRESTOP_AT=() DRAINED_AT=() DELETED_AT=() GONE_AT=() PRESTOP_VIA=() DELETED_UID=()
N_PRESTOP=0

tick() { # one pass of the kubelet's part over the UniMRCP pods
	local pods name ip rc via
	local -a cmd
	pods=$(k -n "$APP_NS" get pods -l app=unimrcp -o json) || return 0
	while read -r name; do
		[ -n "$name" ] || continue
		k -n "$APP_NS" patch pod "$name" --type=merge -p "{\"metadata\":{\"finalizers\":[\"$HOLD_FINALIZER\"]}}" >/dev/null
	done < <(jq -r --arg f "$HOLD_FINALIZER" '.items[] | select(.metadata.deletionTimestamp == null) |
		select((.metadata.finalizers // []) | index($f) | not) | .metadata.name' <<<"$pods")
	sync_uas "$pods"
	while read -r name; do
		[ -n "$name" ] || continue
		if [ -z "${PRESTOP_AT[$name]:-}" ]; then
			# The Service would pick a proxy replica: take them in turn.
			via=${PROXY_IPS[$((N_PRESTOP % ${#PROXY_IPS[@]}))]}
			N_PRESTOP=$((N_PRESTOP + 1))
			mapfile -t cmd < <(jq -r '.[]' <<<"$PRESTOP_CMD" | sed "s/$ADMIN_SVC_HOST/$via/g")
			mkdir -p "$WORK/prestop-$name"
			DELETED_AT[$name]=$(ms)
			DELETED_UID[$name]=$(jq -r --arg n "$name" '.items[] | select(.metadata.name == $n) | .metadata.uid' <<<"$pods")
			PRESTOP_AT[$name]=$(ms)
			PRESTOP_VIA[$name]=$via
			start_bg "prestop-$name" "$WORK/prestop-$name" "$WORK/prestop-$name/out.json" \
				env POD_NAME="$name" POD_NAMESPACE="$APP_NS" "${cmd[@]}"
			log "pod $name terminating: preStop hook started (wait-drained via proxy $via)"
		elif [ -z "${DRAINED_AT[$name]:-}" ] && ! alive "prestop-$name"; then
			rc=0
			wait "${PID_OF[prestop-$name]}" || rc=$?
			unset "PID_OF[prestop-$name]"
			DRAINED_AT[$name]=$(ms)
			[ "$rc" = 0 ] || fail "preStop hook of $name failed (exit $rc): $(cat "$WORK/prestop-$name/out.json")"
			log "pod $name: preStop returned after $(secs $((DRAINED_AT[$name] - PRESTOP_AT[$name]))) s: $(jq -c '{drained, openSessions, waitedSeconds, localSessions, peerSessions}' "$WORK/prestop-$name/out.json" 2>/dev/null)"
			k -n "$APP_NS" patch pod "$name" --type=json -p '[{"op":"remove","path":"/metadata/finalizers"}]' >/dev/null
		fi
	done < <(jq -r --arg f "$HOLD_FINALIZER" '.items[] | select(.metadata.deletionTimestamp != null) |
		select((.metadata.finalizers // []) | index($f)) | .metadata.name' <<<"$pods")
	for name in "${!DELETED_AT[@]}"; do
		# Gone: no pod with the UID that terminated (a new pod of the same name is another one).
		if [ -z "${GONE_AT[$name]:-}" ] && ! jq -e --arg u "${DELETED_UID[$name]}" 'any(.items[]; .metadata.uid == $u)' <<<"$pods" >/dev/null; then
			GONE_AT[$name]=$(ms)
		fi
	done
}

WAITED_AT=""
wait_for() { # LABEL TIMEOUT_S COMMAND...: tick until COMMAND succeeds; WAITED_AT = when
	local label=$1 timeout=$2 deadline=$(($(ms) + $2 * 1000))
	shift 2
	until tick && "$@"; do
		[ "$(ms)" -lt "$deadline" ] || {
			k -n "$APP_NS" get statefulset,hpa,pods -o wide >&2 || true
			k -n "$APP_NS" get scaledobject "$SO" -o jsonpath='{.status}' >&2 || true
			echo >&2
			fail "$label: not within ${timeout}s"
		}
		sleep 0.2
	done
	WAITED_AT=$(ms)
}

# A proxy's view of one pod's destination: state, or "none".
dest_state() { # PROXY_IP POD
	proxy_json "$1" | jq -r --arg p "$APP_NS/$2@" '[.destinations[] | select(.id | startswith($p)) | .state] | first // "none"'
}
state_is() { # POD STATE: every proxy shows POD's destination in STATE ("none": absent)
	local ip
	for ip in "${PROXY_IPS[@]}"; do [ "$(dest_state "$ip" "$1")" = "$2" ] || return 1; done
}
pod_ready() { # POD
	k -n "$APP_NS" get pod "$1" -o json 2>/dev/null | jq -e '.status.podIP != null and
		any(.status.conditions[]?; .type == "Ready" and .status == "True")' >/dev/null
}
replicas_is() { [ "$(k -n "$APP_NS" get statefulset unimrcp -o jsonpath='{.spec.replicas}')" = "$1" ]; }
hpa_desired_is() { [ "$(k -n "$APP_NS" get hpa "$HPA" -o jsonpath='{.status.desiredReplicas}' 2>/dev/null)" = "$1" ]; }
prom_at_least() { jq -ne --arg v "$(promv "$1")" --argjson w "$2" '$v != "none" and ($v | tonumber) >= $w' >/dev/null; }
prom_at_most() { jq -ne --arg v "$(promv "$1")" --argjson w "$2" '$v != "none" and ($v | tonumber) <= $w' >/dev/null; }
open_calls_on() { # POD: open calls on its destination, summed over the proxies (each its own)
	local ip n=0 c
	for ip in "${PROXY_IPS[@]}"; do
		c=$(proxy_json "$ip" | jq --arg p "$APP_NS/$1@" '[.destinations[] | select(.id | startswith($p)) | .openCalls] | add // 0')
		n=$((n + c))
	done
	echo "$n"
}
calls_to() { # PROXY_IP POD: calls routed to the pod's destination by that proxy
	proxy_json "$1" | jq --arg p "$APP_NS/$2@" '[.destinations[] | select(.id | startswith($p)) | .calls] | add // 0'
}
is_set() { # MAP KEY: the associative array MAP has KEY (now, not when the call was written)
	local -n map=$1
	[ -n "${map[$2]:-}" ]
}
open_calls_is() { [ "$(open_calls_on "$1")" = "$2" ]; }

# ---------------------------------------------------------------------------------------------
# The UniMRCP StatefulSet (capacity AS_CAPACITY per pod) and the MrcpServer.

t=$(ms)
example_objects examples/unimrcp-statefulset.yaml |
	jq --arg c "$AS_CAPACITY" '.[] | if .kind == "StatefulSet" then
		.spec.template.metadata.annotations["mrcp-lb.io/pstn-capacity"] = $c else . end' |
	k -n "$APP_NS" apply -f - >/dev/null
k -n "$APP_NS" apply -f examples/mrcpserver.yaml >/dev/null
wait_for "unimrcp-0 registered" 30 state_is unimrcp-0 up
TIMINGS+=("StatefulSet (1 replica) applied -> unimrcp-0 up in every proxy: $(secs $((WAITED_AT - t))) s")
pass "unimrcp-0 up in every proxy (pstn capacity $AS_CAPACITY), held by $HOLD_FINALIZER as a kubelet's grace period would"

# ---------------------------------------------------------------------------------------------
# KEDA: the operator and the metrics adapter as host processes.

mkdir -p "$WORK/keda/certs"
k create namespace "$KEDA_NS" >/dev/null
# The adapter's Service, without selector: its ClusterIP (from 127.2.0.0/16) is where the
# aggregator dials it, and where the adapter listens.
k -n "$KEDA_NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata:
  name: $ADAPTER_SVC
spec:
  ports:
    - {name: https, port: $ADAPTER_PORT, targetPort: $ADAPTER_PORT, protocol: TCP}
EOF
ADAPTER_IP=$(k -n "$KEDA_NS" get service "$ADAPTER_SVC" -o jsonpath='{.spec.clusterIP}')
is_loopback4 "$ADAPTER_IP" || fail "Service $KEDA_NS/$ADAPTER_SVC got ClusterIP $ADAPTER_IP, not in 127.0.0.0/8"
# The aggregator calls an APIService available only if its Service has a ready endpoint with
# the port's name, and EndpointSlices refuse loopback addresses: this one names the Service's
# own DNS name (FQDN). Nothing dials it; the aggregator dials the ClusterIP.
k -n "$KEDA_NS" apply -f - >/dev/null 2>"$WORK/keda/endpointslice.err" <<EOF
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: $ADAPTER_SVC-e2e
  labels:
    kubernetes.io/service-name: $ADAPTER_SVC
    endpointslice.kubernetes.io/managed-by: e2e.mrcp-lb.io
addressType: FQDN
endpoints:
  - addresses: ["$ADAPTER_SVC.$KEDA_NS.svc.cluster.local"]
    conditions: {ready: true}
ports:
  - {name: https, port: $ADAPTER_PORT, protocol: TCP}
EOF

# One CA and one certificate for KEDA's own TLS: the operator's gRPC server and the adapter's
# client of it (mutual TLS, as KEDA's cert-dir), and the adapter's serving certificate, which
# the APIService's caBundle trusts. KEDA's own rotation is off (it would patch the APIService
# with a CA of its own making).
(
	cd "$WORK/keda/certs"
	umask 077
	openssl ecparam -name prime256v1 -genkey -noout -out ca.key
	openssl req -x509 -new -key ca.key -sha256 -days 1 -subj "/CN=keda-e2e-ca" \
		-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
	openssl ecparam -name prime256v1 -genkey -noout -out tls.key
	openssl req -new -key tls.key -subj "/CN=keda" -out tls.csr
	printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
		"extendedKeyUsage=serverAuth,clientAuth" \
		"subjectAltName=DNS:keda-operator.$KEDA_NS.svc,DNS:keda-operator.$KEDA_NS.svc.cluster.local,DNS:$ADAPTER_SVC.$KEDA_NS.svc,DNS:$ADAPTER_SVC.$KEDA_NS.svc.cluster.local,IP:$ADAPTER_IP,IP:$E2E_IP" >tls.ext
	openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 1 -extfile tls.ext -out tls.crt
) >"$WORK/keda/certs.log" 2>&1 || fail "KEDA certificates: $(cat "$WORK/keda/certs.log")"

GRPC_PORT=$(free_port)
KEDA_ENV=(KUBECONFIG="$KUBECONFIG" POD_NAMESPACE="$KEDA_NS" KEDA_CLUSTER_OBJECT_NAMESPACE="$KEDA_NS" WATCH_NAMESPACE="")
t=$(ms)
start_bg keda-operator "$WORK/keda" "$WORK/keda/operator.log" env "${KEDA_ENV[@]}" "$KEDA_OPERATOR" \
	--leader-elect=false --enable-cert-rotation=false --cert-dir="$WORK/keda/certs" --ca-dir="$WORK/keda/certs" \
	--metrics-bind-address="$E2E_IP:$(free_port)" --health-probe-bind-address="$E2E_IP:$(free_port)" \
	--metrics-service-bind-address="$E2E_IP:$GRPC_PORT" --zap-log-level=info
# The adapter's own /metrics binds ":PORT" (all addresses; nothing here connects to it).
start_bg keda-adapter "$WORK/keda" "$WORK/keda/adapter.log" env "${KEDA_ENV[@]}" "$KEDA_ADAPTER" \
	--secure-port="$ADAPTER_PORT" --bind-address="$ADAPTER_IP" --cert-dir="$WORK/keda/certs" \
	--tls-cert-file="$WORK/keda/certs/tls.crt" --tls-private-key-file="$WORK/keda/certs/tls.key" \
	--metrics-service-address="$E2E_IP:$GRPC_PORT" --port="$(free_port)" \
	--lister-kubeconfig="$KUBECONFIG" --authentication-kubeconfig="$KUBECONFIG" --authorization-kubeconfig="$KUBECONFIG"
k apply -f - >/dev/null <<EOF
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: v1beta1.external.metrics.k8s.io
spec:
  group: external.metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  caBundle: $(base64 -w0 "$WORK/keda/certs/ca.crt")
  service: {name: $ADAPTER_SVC, namespace: $KEDA_NS, port: $ADAPTER_PORT}
EOF
keda_alive() { alive keda-operator && alive keda-adapter; }
apiservice_available() {
	keda_alive || fail "KEDA exited: $(tail -3 "$WORK/keda/operator.log" "$WORK/keda/adapter.log")"
	[ "$(k get apiservice v1beta1.external.metrics.k8s.io -o jsonpath='{.status.conditions[?(@.type=="Available")].status}')" = True ]
}
wait_for "APIService v1beta1.external.metrics.k8s.io Available" 60 apiservice_available
so_ready() {
	keda_alive || fail "KEDA exited: $(tail -3 "$WORK/keda/operator.log" "$WORK/keda/adapter.log")"
	[ "$(k -n "$APP_NS" get scaledobject "$SO" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] &&
		k -n "$APP_NS" get hpa "$HPA" >/dev/null 2>&1
}
wait_for "ScaledObject $APP_NS/$SO Ready with its HPA" 60 so_ready
# The HPA controller reads the metric through the aggregator, the adapter, KEDA's operator and
# Prometheus: a current value in the HPA's status is the whole chain working.
hpa_reads() { k -n "$APP_NS" get hpa "$HPA" -o json | jq -e '.status.currentMetrics[0].external.current.value != null' >/dev/null; }
wait_for "HPA $HPA reads the external metric" 60 hpa_reads
TIMINGS+=("KEDA started -> APIService Available, ScaledObject Ready, HPA reads the metric: $(secs $((WAITED_AT - t))) s")
EXT_METRIC=$(k get --raw "/apis/external.metrics.k8s.io/v1beta1/namespaces/$APP_NS/s0-prometheus?labelSelector=scaledobject.keda.sh%2Fname%3D$SO") ||
	fail "GET external.metrics.k8s.io through the aggregator"
pass "KEDA $KEDA_VERSION: adapter on the Service's ClusterIP $ADAPTER_IP:$ADAPTER_PORT, APIService Available; external metric s0-prometheus = $(jq -r '.items[0].value' <<<"$EXT_METRIC") through the aggregator; HPA $HPA: $(k -n "$APP_NS" get hpa "$HPA" --no-headers | tr -s ' ')"
replicas_is 1 || fail "the StatefulSet has $(k -n "$APP_NS" get statefulset unimrcp -o jsonpath='{.spec.replicas}') replicas before any load, want 1"

# ---------------------------------------------------------------------------------------------
# Scale-up: AS_LOAD_CALLS long calls through the first proxy.

PA=${PROXY_IPS[0]} PB=${PROXY_IPS[1]:-${PROXY_IPS[0]}}
UP_UTIL=$(jq -n "$AS_LOAD_CALLS / $AS_CAPACITY")
jq -ne "$UP_UTIL > $AS_TARGET * 1.1" >/dev/null || fail "AS_LOAD_CALLS/AS_CAPACITY = $UP_UTIL is not above AS_TARGET ($AS_TARGET) by the HPA's 10 % tolerance"
log "scale-up: $AS_LOAD_CALLS calls held ${AS_LOAD_HOLD}s through proxy $PA (utilization $UP_UTIL of 1 server, target $AS_TARGET)"
T_UP=$(ms)
start_client client-load "$PA" "$AS_LOAD_CALLS" 20 $((AS_LOAD_HOLD * 1000))
wait_for "the proxies count $AS_LOAD_CALLS open calls on unimrcp-0" 30 open_calls_is unimrcp-0 "$AS_LOAD_CALLS"
T_OPEN=$WAITED_AT
wait_for "utilization >= $UP_UTIL in Prometheus" 30 prom_at_least "$UTIL_Q" "$UP_UTIL"
T_PROM_UP=$WAITED_AT
wait_for "HPA desires 2 replicas" "$AS_TIMEOUT" hpa_desired_is 2
T_HPA_UP=$WAITED_AT
wait_for "StatefulSet scaled to 2" 30 replicas_is 2
T_STS_UP=$WAITED_AT
wait_for "unimrcp-1 Ready" 30 pod_ready unimrcp-1
T_READY=$WAITED_AT
wait_for "unimrcp-1 up in every proxy" 30 state_is unimrcp-1 up
T_REG=$WAITED_AT
for ip in "${PROXY_IPS[@]}"; do check_loopback "$ip"; done
pass "scale-up: HPA $HPA 1 -> 2, unimrcp-1 Ready and up in every proxy $(secs $((T_REG - T_UP))) s after the calls started"

# New calls go to the new server (least loaded: it is empty, unimrcp-0 is at $UP_UTIL), through
# the other proxy, which knows the first one's calls from the cluster's load sharing.
before=$(calls_to "$PB" unimrcp-1)
T_TAIL=$(ms)
start_client client-tail "$PB" "$AS_TAIL_CALLS" 20 $((AS_TAIL_HOLD * 1000))
wait_for "$AS_TAIL_CALLS new calls open on unimrcp-1" 30 open_calls_is unimrcp-1 "$AS_TAIL_CALLS"
T_LAND=$WAITED_AT
landed=$(($(calls_to "$PB" unimrcp-1) - before))
[ "$landed" = "$AS_TAIL_CALLS" ] || fail "$landed of $AS_TAIL_CALLS new calls through $PB went to unimrcp-1"
[ "$(open_calls_on unimrcp-0)" = "$AS_LOAD_CALLS" ] || fail "unimrcp-0 has $(open_calls_on unimrcp-0) open calls, want $AS_LOAD_CALLS"
pass "the $AS_TAIL_CALLS new calls through $PB all landed on unimrcp-1 ($(secs $((T_LAND - T_TAIL))) s); unimrcp-0 keeps its $AS_LOAD_CALLS"
# Stable at 2 while both carry calls.
{ hpa_desired_is 2 && replicas_is 2; } || fail "the HPA does not stay at 2 with both servers busy: $(k -n "$APP_NS" get hpa "$HPA" --no-headers)"

# ---------------------------------------------------------------------------------------------
# Scale-down: the first calls end; unimrcp-1 still carries the tail calls when it is removed.

DOWN_UTIL=$(jq -n "$AS_TAIL_CALLS / (2 * $AS_CAPACITY)")
log "scale-down: waiting for the $AS_LOAD_CALLS first calls to end (utilization then $DOWN_UTIL of 2 servers)"
wait_for "the first calls end" $((AS_LOAD_HOLD + 30)) open_calls_is unimrcp-0 0
T_DOWN=$WAITED_AT
wait_client client-load
wait_for "utilization <= $DOWN_UTIL in Prometheus" 30 prom_at_most "$UTIL_Q" "$DOWN_UTIL"
T_PROM_DOWN=$WAITED_AT
wait_for "HPA desires 1 replica" "$AS_TIMEOUT" hpa_desired_is 1
T_HPA_DOWN=$WAITED_AT
wait_for "unimrcp-1 terminating (preStop started)" 30 is_set PRESTOP_AT unimrcp-1
T_DEL=${DELETED_AT[unimrcp-1]}
open_at_delete=$(open_calls_on unimrcp-1)
[ "$open_at_delete" -gt 0 ] ||
	fail "unimrcp-1 was removed with no open call: the tail calls (${AS_TAIL_HOLD}s) ended before the scale-down; raise AS_TAIL_HOLD"
wait_for "unimrcp-1 draining in every proxy" 15 state_is unimrcp-1 draining
T_DRAINING=$WAITED_AT
log "unimrcp-1 terminating with $open_at_delete open calls; draining in every proxy"
wait_for "the preStop hook returns (drained)" $((AS_TAIL_HOLD + 30)) is_set DRAINED_AT unimrcp-1
T_DRAINED=${DRAINED_AT[unimrcp-1]}
jq -e '.drained == true and .openSessions == 0' "$WORK/prestop-unimrcp-1/out.json" >/dev/null ||
	fail "the preStop hook answered $(cat "$WORK/prestop-unimrcp-1/out.json")"
wait_client client-tail
wait_for "unimrcp-1 gone" 30 is_set GONE_AT unimrcp-1
T_GONE=${GONE_AT[unimrcp-1]}
# No flapping: the HPA rescaled twice in the whole cycle (a draining pod still counts as a
# ready replica for the HPA; a trigger that ignored it would scale straight back to 2).
# Equal Events are counted in one (count), so "New size: 2" twice is one Event of count 2.
rescales=$(k -n "$APP_NS" get events -o json | jq -c '[.items[] | select(.involvedObject.kind == "HorizontalPodAutoscaler" and
	.reason == "SuccessfulRescale") | {message, count: (.count // 1)}]')
[ "$(jq '[.[].count] | add' <<<"$rescales")" = 2 ] ||
	fail "the HPA rescaled $(jq '[.[].count] | add' <<<"$rescales") times, want 2 (1 -> 2 -> 1): $rescales"
wait_for "unimrcp-1 removed from every proxy" 30 state_is unimrcp-1 none
T_UNREG=$WAITED_AT
[ -z "${SIPP_IP[unimrcp-1]:-}" ] || fail "the sipp server of unimrcp-1 still runs"
{ replicas_is 1 && state_is unimrcp-0 up; } || fail "after the scale-down: StatefulSet $(k -n "$APP_NS" get statefulset unimrcp -o jsonpath='{.spec.replicas}') replicas, unimrcp-0 $(dest_state "$PA" unimrcp-0)"
pass "scale-down: HPA 2 -> 1, unimrcp-1 drained its $open_at_delete calls (hook via proxy ${PRESTOP_VIA[unimrcp-1]}: $(jq -c '{waitedSeconds, localSessions, peerSessions}' "$WORK/prestop-unimrcp-1/out.json")) and went; unimrcp-0 up"

# ---------------------------------------------------------------------------------------------
# Failed calls: none, by the clients and by every proxy.

failed=0
for ip in "${PROXY_IPS[@]}"; do
	st=$(hcurl "http://$ip:$PROXY_ADMIN_PORT/v1/dialogs/stats")
	failed=$((failed + $(jq '.failed + .expired + .rejectedNoCapacity' <<<"$st")))
	[ "$(jq .active <<<"$st")" = 0 ] || fail "proxy $ip still has active dialogs: $st"
done
calls_ok=$(($(sipp_col "$WORK/client-load/stat.csv" 'SuccessfulCall(C)') + $(sipp_col "$WORK/client-tail/stat.csv" 'SuccessfulCall(C)')))
calls_failed=$(($(sipp_col "$WORK/client-load/stat.csv" 'FailedCall(C)') + $(sipp_col "$WORK/client-tail/stat.csv" 'FailedCall(C)')))
{ [ "$calls_failed" = 0 ] && [ "$failed" = 0 ] && [ "$calls_ok" = $((AS_LOAD_CALLS + AS_TAIL_CALLS)) ]; } ||
	fail "calls: $calls_ok successful, $calls_failed failed (sipp clients); proxies count $failed failed/expired/refused"
pass "failed calls through the whole cycle: 0 ($calls_ok/$calls_ok successful; the proxies count 0 failed, expired or refused)"

FAILED=0
echo
echo "================ mrcp-lb autoscale e2e: PASSED in $(secs "$(ms)") s ================"
d() { secs $(($2 - $1)); }
TIMINGS+=(
	"scale-up (calls start at 0):"
	"  calls open in the proxies                          $(d "$T_UP" "$T_OPEN") s"
	"  mrcp_lb_server_utilization >= $UP_UTIL in Prometheus   $(d "$T_UP" "$T_PROM_UP") s"
	"  HPA desiredReplicas 2                              $(d "$T_UP" "$T_HPA_UP") s"
	"  StatefulSet replicas 2                             $(d "$T_UP" "$T_STS_UP") s"
	"  unimrcp-1 Ready                                    $(d "$T_UP" "$T_READY") s"
	"  unimrcp-1 up in every proxy (registered)           $(d "$T_UP" "$T_REG") s"
	"  new calls landed on unimrcp-1                      $(d "$T_UP" "$T_LAND") s  ($(d "$T_TAIL" "$T_LAND") s after they started)"
	"scale-down (first calls ended at 0):"
	"  mrcp_lb_server_utilization <= $DOWN_UTIL in Prometheus   $(d "$T_DOWN" "$T_PROM_DOWN") s"
	"  HPA desiredReplicas 1                              $(d "$T_DOWN" "$T_HPA_DOWN") s  (stabilization window 10 s)"
	"  unimrcp-1 terminating (preStop hook started)       $(d "$T_DOWN" "$T_DEL") s  with $open_at_delete open calls"
	"  unimrcp-1 draining in every proxy                  $(d "$T_DOWN" "$T_DRAINING") s"
	"  drain complete (hook returned 200)                 $(d "$T_DOWN" "$T_DRAINED") s  ($(d "$T_DEL" "$T_DRAINED") s after termination: the tail calls' end)"
	"  unimrcp-1 gone                                     $(d "$T_DOWN" "$T_GONE") s"
	"  unimrcp-1 removed from every proxy                 $(d "$T_DOWN" "$T_UNREG") s"
	"failed calls: $calls_failed (clients), $failed (proxies)"
)
echo "Timings:"
printf '  %s\n' "${TIMINGS[@]}"
echo "Checks:"
printf '  %s\n' "${SUMMARY[@]}"
