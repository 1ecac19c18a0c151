#!/usr/bin/env bash
# The operator's memory on a big cluster: a real kube-apiserver + etcd with kwok nodes
# (tests/k8s/control-plane.sh start --full), PODS pods of which MRCP of them are UniMRCP
# server pods selected by MrcpServers, the rest ordinary application pods. Runs each
# operator binary given in turn against the same cluster, waits until it has registered
# every MRCP pod, and prints its resident memory (VmRSS, and the peak VmHWM) side by side.
# Also prints what one full LIST of the cluster's pods weighs against a label-selected one.
#
#   bench/operator-memory.sh                       # the workspace's debug build
#   OPERATORS="before=/path/old-lb-operator after=target/release/lb-operator" bench/operator-memory.sh
#   PODS=5000 MRCP=50 NODES=50 KEEP_DIR=/tmp/opmem bench/operator-memory.sh
#
# Each entry of OPERATORS is LABEL=BINARY[:EXTRA ARGS separated by commas]; e.g.
#   "selected=target/debug/lb-operator:--pod-selector,mrcp-lb.io/server"
# Not part of `make test` (creating 5,000 pods takes a few minutes on 2 cores): `make bench-operator`.
# Listens on 127.0.12.1 only; the pods' IPs (127.1.x.y) are never dialled (no proxy is given).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tests/k8s/lib.sh
source "$ROOT/tests/k8s/lib.sh"
KUBECTL_BIN=$(k8s_bin kubectl)
PODS=${PODS:-5000}
MRCP=${MRCP:-50}
NODES=${NODES:-50}
SERVERS=${SERVERS:-5}
SETTLE=${SETTLE:-20}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OPERATORS=${OPERATORS:-"current=$TARGET/debug/lb-operator"}
DIR=${KEEP_DIR:-$(mktemp -d /tmp/mrcp-lb-opmem.XXXXXX)}
LISTEN_IP=127.0.12.1

log() { echo "operator-memory: $*" >&2; }
k() { "$KUBECTL_BIN" --kubeconfig "$DIR/kubeconfig" "$@"; }

OP_PID=""
cleanup() {
	if [ -n "$OP_PID" ]; then kill "$OP_PID" 2>/dev/null || true; fi
	if [ -z "${KEEP_DIR:-}" ]; then "$ROOT/tests/k8s/control-plane.sh" stop "$DIR" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

if [ -f "$DIR/kubeconfig" ] && k get --raw /readyz >/dev/null 2>&1; then
	log "reusing the control plane in $DIR"
else
	"$ROOT/tests/k8s/control-plane.sh" start "$DIR" --full --nodes "$NODES"
fi
k apply -f "$ROOT/crds/" >/dev/null
k wait --for condition=established crd/mrcpservers.mrcp-lb.io --timeout 60s >/dev/null

# The pods: ordinary ones look like a typical application pod (two containers with env,
# ports, probes, resources, volume mounts; a few labels and annotations), spread over
# namespaces; MRCP ones carry app=unimrcp, the opt-in label and a capacity annotation.
python3 - "$DIR/pods" "$PODS" "$MRCP" "$NODES" "$SERVERS" <<'EOF'
import json, os, sys
out, pods, mrcp, nodes, servers = sys.argv[1], *map(int, sys.argv[2:])
os.makedirs(out, exist_ok=True)
def container(name, image):
    return {
        "name": name, "image": image,
        "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}],
        "env": [{"name": f"SETTING_{i}", "value": f"value-{i}-of-{name}"} for i in range(6)],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}],
    }
def pod(i, ns, name, labels, annotations):
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations},
        "spec": {
            "nodeName": f"kwok-node-{i % nodes}",
            "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [container("app", "registry.example/team/app:1.2.3"),
                           container("sidecar", "registry.example/mesh/proxy:1.20")],
            "volumes": [{"name": "config", "configMap": {"name": "app-config"}}],
        },
    }
namespaces = [f"apps-{n}" for n in range(10)]
items = []
for i in range(pods - mrcp):
    ns = namespaces[i % len(namespaces)]
    app = f"svc-{i % 97}"
    items.append(pod(i, ns, f"{app}-{i}", {
        "app": app, "app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "shop",
        "pod-template-hash": f"{i % 9973:08x}"},
        {"prometheus.io/scrape": "true", "checksum/config": f"{i:064x}"}))
for j in range(mrcp):
    i = pods - mrcp + j
    items.append(pod(i, "speech", f"unimrcp-{j}", {
        "app": "unimrcp", "mrcp-lb.io/server": "", "shard": f"s{j % servers}"},
        {"mrcp-lb.io/resources": "speechrecog=50;speechsynth=100"}))
chunk = 250
for c in range(0, len(items), chunk):
    with open(f"{out}/pods-{c // chunk:03d}.json", "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items[c:c + chunk]}, f)
EOF

have=$(k get pods -A --no-headers 2>/dev/null | wc -l)
if [ "$have" -lt "$PODS" ]; then
	for ns in speech apps-{0..9}; do k create namespace "$ns" >/dev/null 2>&1 || true; done
	for s in $(seq 0 $((SERVERS - 1))); do
		k apply -f - >/dev/null <<EOF
apiVersion: mrcp-lb.io/v1alpha1
kind: MrcpServer
metadata: {name: unimrcp-s$s, namespace: speech}
spec:
  selector: {matchLabels: {app: unimrcp, shard: s$s}}
EOF
	done
	log "creating $PODS pods ($MRCP MRCP servers) in chunks of 250, 4 at a time"
	started=$SECONDS
	# shellcheck disable=SC2016
	find "$DIR/pods" -name 'pods-*.json' | sort |
		xargs -P 4 -I{} sh -c '"$0" --kubeconfig "$1" create -f "$2" >/dev/null 2>>"$1.create-errors" || true' \
			"$KUBECTL_BIN" "$DIR/kubeconfig" {}
	log "created in $((SECONDS - started)) s"
fi
deadline=$((SECONDS + 900))
while :; do
	running=$(k get pods -A --field-selector status.phase=Running --no-headers 2>/dev/null | wc -l)
	[ "$running" -ge "$PODS" ] && break
	[ $SECONDS -lt $deadline ] || { log "only $running of $PODS pods Running after 15 min"; exit 1; }
	log "$running of $PODS pods Running"
	sleep 10
done
log "$running pods Running"

full=$(k get --raw '/api/v1/pods?limit=0' | wc -c)
selected=$(k get --raw '/api/v1/pods?labelSelector=mrcp-lb.io%2Fserver' | wc -c)

metric() { # NAME: the operator's metric value
	curl -fsS --noproxy '*' --max-time 2 "http://$LISTEN_IP:$PORT/metrics" 2>/dev/null |
		awk -v m="$1" '$1 == m { print $2 }'
}
results=()
port=18180
for entry in $OPERATORS; do
	label=${entry%%=*}
	rest=${entry#*=}
	bin=${rest%%:*}
	extra=""
	[ "$rest" != "$bin" ] && extra=${rest#*:}
	PORT=$port
	port=$((port + 1))
	IFS=, read -r -a args <<<"$extra"
	log "$label: $bin ${args[*]}"
	KUBECONFIG="$DIR/kubeconfig" "$bin" --listen "$LISTEN_IP:$PORT" --load-interval-seconds 0 \
		--proxy-cluster-port 0 "${args[@]}" >"$DIR/operator-$label.log" 2>&1 &
	OP_PID=$!
	t0=$SECONDS
	until [ "$(metric mrcp_lb_operator_destinations)" = "$MRCP" ]; do
		kill -0 "$OP_PID" 2>/dev/null || { log "$label exited: $DIR/operator-$label.log"; tail -5 "$DIR/operator-$label.log" >&2; exit 1; }
		[ $((SECONDS - t0)) -lt 300 ] || { log "$label: no $MRCP destinations after 300 s"; exit 1; }
		sleep 0.5
	done
	synced=$((SECONDS - t0))
	sleep "$SETTLE"
	rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$OP_PID/status")
	hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$OP_PID/status")
	kill "$OP_PID"
	wait "$OP_PID" 2>/dev/null || true
	OP_PID=""
	results+=("$(printf '%-10s %8.1f %8.1f %6d   %s' "$label" "$(echo "$rss/1024" | bc -l)" "$(echo "$hwm/1024" | bc -l)" "$synced" "${args[*]:-}")")
done

echo
echo "Cluster: $PODS pods ($MRCP MRCP server pods in $SERVERS MrcpServers), $NODES kwok nodes"
echo "One LIST of all pods: $((full / 1024)) KiB of JSON; with labelSelector=mrcp-lb.io/server: $((selected / 1024)) KiB"
echo
echo "operator   RSS(MiB) peak(MiB) ready(s) flags"
printf '%s\n' "${results[@]}"
