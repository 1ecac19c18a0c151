# shellcheck shell=bash
# Shared by the end-to-end tests (tests/e2e/run.sh, tests/e2e/autoscale.sh): the processes they
# start and stop by PID, the control plane, the chart installed with helm, the real lb-proxy
# replicas on the chart's proxy pod IPs and the real lb-operator with the chart's args, a real
# Prometheus, sipp servers for the UniMRCP pods and sipp clients. Source it after
# `set -Eeuo pipefail`, with ROOT set and the repository as the working directory; it sets the
# EXIT trap (cleanup: every process stopped by its PID, the control plane stopped, the work
# directory removed unless the run failed or E2E_KEEP=1).
#
# Functions that do a phase, in the order the tests call them:
#   e2e_prepare          tools, the e2e lock, the work directory, the binaries, helm lint
#   e2e_control_plane    control-plane.sh start --full --nodes 2; defines k (kubectl)
#   e2e_helm_install ARGS...   helm install --wait of charts/mrcp-lb with ARGS; every object there
#   e2e_proxies_and_operator   the chart's operator Deployment to 0, a real lb-proxy per proxy
#                        pod, the real lb-operator (E2E_OPERATOR_ARGS=(--name=value ...) replace
#                        or add to the chart's args)
#   e2e_prometheus       a real Prometheus scraping the proxies (pod annotations) and the operator

E2E_IP=${E2E_IP:-127.0.6.1}
RELEASE=mrcp-lb
NS=mrcp-system
# shellcheck disable=SC2034 # APP_NS, HOLD_FINALIZER: for the scripts that source this
APP_NS=speech
SIP_PORT=8060 # MrcpServer sipPort in examples/mrcpserver.yaml
# shellcheck disable=SC2034
HOLD_FINALIZER=e2e.mrcp-lb.io/hold

# Nothing here may go through an HTTP proxy: every address is local.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY='*' no_proxy='*'

T0=${EPOCHREALTIME/./}
ms() { local t=${EPOCHREALTIME/./}; echo $(((t - T0) / 1000)); }
secs() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }
log() { printf '[%8ss] %s\n' "$(secs "$(ms)")" "$*"; }

WORK=""
FAILED=1
CP_STARTED=false
declare -A PID_OF=()  # name -> pid of every background process this script started
declare -a STARTED=() # names, in start order
declare -a SUMMARY=()
declare -a TIMINGS=()
declare -a PROXY_IPS=()
declare -a PROXY_PODS=()
declare -A SIPP_IP=() # MRCP server pod name -> IP its sipp server listens on
declare -a E2E_OPERATOR_ARGS=() # --name=value for the operator: replaces the chart's --name=..., or added
declare -a E2E_LOGS=()         # more logs whose last lines a failed run shows

fail() {
	echo >&2
	echo "E2E FAILED: $*" >&2
	exit 1
}
pass() {
	SUMMARY+=("ok    $*")
	log "ok: $*"
}
note() {
	SUMMARY+=("note  $*")
	log "note: $*"
}
declare -a WARNINGS=()
warn() { # a problem found; fails the run at the end unless E2E_STRICT=0
	SUMMARY+=("WARN  $*")
	WARNINGS+=("$*")
	log "WARNING: $*"
}
trap 'rc=$?; echo "e2e: command failed (exit $rc) at line $LINENO: $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Processes: every one is started here, remembered by PID and stopped by that PID.

start_bg() { # NAME DIR LOGFILE CMD...: run CMD in DIR in the background
	local name=$1 dir=$2 logf=$3
	shift 3
	(cd "$dir" && exec "$@") </dev/null >"$logf" 2>&1 &
	PID_OF[$name]=$!
	STARTED+=("$name")
}

alive() { [ -n "${PID_OF[$1]:-}" ] && kill -0 "${PID_OF[$1]}" 2>/dev/null; }

stop_bg() { # NAME [SECONDS]: TERM, then KILL after SECONDS (default 5); reap
	local name=$1 grace=${2:-5} pid i
	pid=${PID_OF[$name]:-}
	[ -n "$pid" ] || return 0
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		case $name in
		# SIGTERM makes lb-proxy drain (up to the chart's 300 s); a second one stops it.
		proxy-*)
			sleep 0.2
			kill -TERM "$pid" 2>/dev/null || true
			;;
		esac
		for ((i = 0; i < grace * 10; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			echo "e2e: $name (pid $pid) ignored SIGTERM; killing it" >&2
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	wait "$pid" 2>/dev/null || true
	unset "PID_OF[$name]"
}

cleanup() {
	local rc=$? i name
	trap - ERR
	set +e
	if [ "$FAILED" != 0 ] && [ "$rc" = 0 ]; then rc=1; fi
	if [ "$rc" != 0 ] && [ -n "$WORK" ]; then
		echo >&2
		echo "---- last lines of the logs ($WORK) ----" >&2
		for f in "$WORK"/proxy-*/proxy.log "$WORK"/operator/operator.log "$WORK"/prometheus/prometheus.log "${E2E_LOGS[@]}"; do
			[ -f "$f" ] || continue
			echo "== $f" >&2
			tail -n 15 "$f" >&2
		done
	fi
	for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
		name=${STARTED[$i]}
		[ -n "${PID_OF[$name]:-}" ] && stop_bg "$name" 5
	done
	if $CP_STARTED; then
		"$ROOT/tests/k8s/control-plane.sh" stop "$WORK/cp" >"$WORK/cp-stop.log" 2>&1 ||
			echo "e2e: control-plane.sh stop failed (see $WORK/cp-stop.log)" >&2
	fi
	if [ "$rc" = 0 ]; then
		if [ "${E2E_KEEP:-0}" = 1 ]; then echo "e2e: files kept in $WORK"; else rm -rf "$WORK"; fi
	elif [ -n "$WORK" ]; then
		echo "e2e: FAILED (exit $rc); logs and files kept in $WORK" >&2
	fi
	exit "$rc"
}
trap cleanup EXIT

free_port() { # a free TCP port on $E2E_IP
	python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$E2E_IP"
}

udp_ports() { # IP N: a port P such that UDP P .. P+N-1 are free on IP (for sipp's control and
	# media sockets: free ports rather than fixed ones, in case something holds them on 0.0.0.0)
	python3 - "$1" "$2" <<'PY'
import random, socket, sys
ip, n = sys.argv[1], int(sys.argv[2])
for _ in range(200):
    base = random.randrange(20000, 30000 - n)
    socks = []
    try:
        for p in range(base, base + n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.bind((ip, p))
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    print(base)
    sys.exit(0)
sys.exit("no free UDP ports on " + ip)
PY
}

is_loopback4() { # IPv4 address in 127.0.0.0/8
	[[ $1 =~ ^127\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] &&
		[ "${BASH_REMATCH[1]}" -le 255 ] && [ "${BASH_REMATCH[2]}" -le 255 ] && [ "${BASH_REMATCH[3]}" -le 255 ]
}

hcurl() { curl -fsS --noproxy '*' --max-time 3 "$@"; }

# ---------------------------------------------------------------------------------------------
# Phases.

e2e_prepare() {
	for t in curl jq python3 sipp prometheus openssl base64 ss flock; do
		command -v "$t" >/dev/null || fail "$t is needed (make deps / apt-get install prometheus sip-tester jq curl)"
	done

	# Pod IPs (127.1.x.y) are the same in every control plane: two runs at once would collide.
	exec 9>"${TMPDIR:-/tmp}/mrcp-lb-e2e.lock"
	flock -w 900 9 || fail "another tests/e2e/run.sh holds ${TMPDIR:-/tmp}/mrcp-lb-e2e.lock"

	WORK=$(mktemp -d "${TMPDIR:-/tmp}/mrcp-lb-e2e.XXXXXX")
	CP=$WORK/cp
	mkdir -p "$WORK/helm"
	export HELM_CACHE_HOME=$WORK/helm/cache HELM_CONFIG_HOME=$WORK/helm/config HELM_DATA_HOME=$WORK/helm/data
	log "work directory $WORK"

	log "building the Kubernetes binaries (cached)"
	"$ROOT/tests/k8s/build.sh" >"$WORK/k8s-build.log" 2>&1 || {
		tail -20 "$WORK/k8s-build.log" >&2
		fail "tests/k8s/build.sh failed"
	}
	# shellcheck source=../k8s/env.sh
	source "$ROOT/tests/k8s/env.sh"
	if [ -n "${LB_PROXY_BIN:-}" ] && [ -n "${LB_OPERATOR_BIN:-}" ]; then
		log "using LB_PROXY_BIN=$LB_PROXY_BIN LB_OPERATOR_BIN=$LB_OPERATOR_BIN"
	else
		log "cargo build -p lb-proxy -p lb-operator"
		cargo build -p lb-proxy -p lb-operator >"$WORK/cargo-build.log" 2>&1 || {
			tail -30 "$WORK/cargo-build.log" >&2
			fail "cargo build -p lb-proxy -p lb-operator failed"
		}
		tdir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
		LB_PROXY_BIN=${LB_PROXY_BIN:-$tdir/debug/lb-proxy}
		LB_OPERATOR_BIN=${LB_OPERATOR_BIN:-$tdir/debug/lb-operator}
	fi
	[ -x "$LB_PROXY_BIN" ] || fail "no lb-proxy binary at $LB_PROXY_BIN"
	[ -x "$LB_OPERATOR_BIN" ] || fail "no lb-operator binary at $LB_OPERATOR_BIN"

	# Nobody else may hold the ports the pods' processes bind (a wildcard bind would block ours).
	busy=$(ss -Htuln | awk '{print $5}' | grep -E '^(0\.0\.0\.0|\*|\[::\]|127\.1\.[0-9]+\.[0-9]+):(5060|7070|8060|8081)$' || true)
	[ -z "$busy" ] || fail "ports the pod processes need are taken: $(echo "$busy" | tr '\n' ' ')(ss -tulnp)"

	"$HELM" lint charts/mrcp-lb >"$WORK/helm-lint.log" 2>&1 || {
		cat "$WORK/helm-lint.log" >&2
		fail "helm lint charts/mrcp-lb"
	}
	pass "helm lint charts/mrcp-lb ($(grep -c '\[WARNING\]' "$WORK/helm-lint.log" || true) warnings)"
}

e2e_control_plane() {
	t=$(ms)
	CP_STARTED=true
	"$ROOT/tests/k8s/control-plane.sh" start "$CP" --full --nodes 2 >"$WORK/cp-start.log" 2>&1 || {
		tail -20 "$WORK/cp-start.log" >&2
		fail "control plane did not start (logs in $CP)"
	}
	export KUBECONFIG=$CP/kubeconfig
	# shellcheck disable=SC2317 # defined here, called everywhere after
	k() { "$KUBECTL" "$@"; }
	TIMINGS+=("control plane up (etcd, apiserver, controller-manager, scheduler, kwok, 2 nodes): $(secs $(($(ms) - t))) s")
	log "control plane up ($K8S_VERSIONS)"
}

e2e_helm_install() { # HELM ARGS...: helm install --wait of charts/mrcp-lb in $NS
	t=$(ms)
	"$HELM" install "$RELEASE" charts/mrcp-lb -n "$NS" --create-namespace --wait --timeout 120s "$@" \
		>"$WORK/helm-install.log" 2>&1 || {
		cat "$WORK/helm-install.log" >&2
		fail "helm install $RELEASE charts/mrcp-lb -n $NS --wait"
	}
	k -n "$NS" wait --for=condition=Available deployment --all --timeout=60s >/dev/null ||
		fail "the chart's Deployments did not become Available"
	k wait --for=condition=Established crd/mrcpservers.mrcp-lb.io --timeout=30s >/dev/null ||
		fail "CRD mrcpservers.mrcp-lb.io not Established"
	"$HELM" get manifest "$RELEASE" -n "$NS" >"$WORK/manifest.yaml"
	rendered=$(grep -c '^kind:' "$WORK/manifest.yaml")
	# Objects without a namespace are in the release's; some name another (the ScaledObject):
	# kubectl -n would refuse those, a context namespace does not.
	cp "$KUBECONFIG" "$WORK/kubeconfig-release"
	KUBECONFIG=$WORK/kubeconfig-release k config set-context --current --namespace="$NS" >/dev/null
	present=$(KUBECONFIG=$WORK/kubeconfig-release k get -f "$WORK/manifest.yaml" -o name | tee "$WORK/objects.txt" | wc -l)
	[ "$present" = "$rendered" ] || fail "helm rendered $rendered objects but $present exist: $(cat "$WORK/objects.txt")"
	TIMINGS+=("helm install --wait: $(secs $(($(ms) - t))) s")
	pass "helm install: $present objects + CRD accepted by kube-apiserver $KUBE_VERSION; Deployments Available ($(k -n "$NS" get deploy -o json | jq -r '[.items[] | "\(.metadata.name) \(.status.availableReplicas)/\(.spec.replicas)"] | join(", ")'))"
}

# The container's env as the kubelet would build it (value with $(VAR) references, fieldRef,
# secretKeyRef), one NAME=VALUE per line.
pod_env() { # DEPLOYMENT_JSON POD_NAME POD_IP
	local dep=$1 pod=$2 ip=$3 name kind arg val v
	local -A seen=()
	while IFS=$'\t' read -r name kind arg; do
		case $kind in
		value)
			val=$arg
			for v in "${!seen[@]}"; do val=${val//"\$($v)"/${seen[$v]}}; done
			;;
		field)
			case $arg in
			metadata.name) val=$pod ;;
			metadata.namespace) val=$NS ;;
			status.podIP) val=$ip ;;
			*) fail "unsupported fieldRef $arg in env $name" ;;
			esac
			;;
		secret) val=$(k -n "$NS" get secret "${arg%%/*}" -o json | jq -er --arg k "${arg#*/}" '.data[$k]' | base64 -d) ||
			fail "env $name: secret key $arg not found" ;;
		*) fail "unsupported env source for $name" ;;
		esac
		seen[$name]=$val
		printf '%s=%s\n' "$name" "$val"
	done < <(jq -r '.spec.template.spec.containers[0].env[]? |
		[.name,
		 (if .value != null then "value" elif .valueFrom.fieldRef then "field" elif .valueFrom.secretKeyRef then "secret" else "other" end),
		 (.value // .valueFrom.fieldRef.fieldPath // (.valueFrom.secretKeyRef | if . then "\(.name)/\(.key)" else "" end))] | @tsv' <<<"$dep")
}

e2e_proxies_and_operator() {
	# The chart's operator pod is simulated by kwok: the real operator runs locally instead.
	OP_DEPLOY=$(k -n "$NS" get deploy -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=operator" -o json)
	[ "$(jq '.items | length' <<<"$OP_DEPLOY")" = 1 ] || fail "expected one operator Deployment"
	OP_DEPLOY=$(jq '.items[0]' <<<"$OP_DEPLOY")
	OP_DEPLOY_NAME=$(jq -r .metadata.name <<<"$OP_DEPLOY")
	PROXY_DEPLOY=$(k -n "$NS" get deploy -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=proxy" -o json | jq '.items[0]')
	[ "$PROXY_DEPLOY" != null ] || fail "no proxy Deployment"
	k -n "$NS" scale deployment "$OP_DEPLOY_NAME" --replicas=0 >/dev/null
	k -n "$NS" wait --for=delete pod -l "$(jq -r '.spec.selector.matchLabels | to_entries | map("\(.key)=\(.value)") | join(",")' <<<"$OP_DEPLOY")" \
		--timeout=30s >/dev/null 2>&1 || true
	[ "$(k -n "$NS" get pods -l app.kubernetes.io/component=operator -o name | wc -l)" = 0 ] ||
		fail "the operator Deployment's pod is still there after scaling to 0"
	log "operator Deployment $OP_DEPLOY_NAME scaled to 0"


	# The operator's args exactly as the chart renders them; only the token path and the listen
	# address are local.
	mapfile -t CHART_OP_ARGS < <(jq -r '.spec.template.spec.containers[0].args[]' <<<"$OP_DEPLOY")
	PROXY_SELECTOR="" PROXY_NAMESPACE="" PROXY_ADMIN_PORT="" LEASE_NAME=""
	for a in "${CHART_OP_ARGS[@]}"; do
		case $a in
		--proxy-selector=*) PROXY_SELECTOR=${a#*=} ;;
		--proxy-namespace=*) PROXY_NAMESPACE=${a#*=} ;;
		--proxy-admin-port=*) PROXY_ADMIN_PORT=${a#*=} ;;
		--lease-name=*) LEASE_NAME=${a#*=} ;;
		esac
	done
	[ -n "$PROXY_SELECTOR" ] && [ -n "$PROXY_NAMESPACE" ] && [ -n "$PROXY_ADMIN_PORT" ] ||
		fail "the operator Deployment lacks --proxy-selector=/--proxy-namespace=/--proxy-admin-port=: ${CHART_OP_ARGS[*]}"
	log "chart operator args: ${CHART_OP_ARGS[*]}"


	PROXY_CM=$(jq -r '.spec.template.spec.volumes[] | select(.configMap) | .configMap.name' <<<"$PROXY_DEPLOY" | head -1)
	[ -n "$PROXY_CM" ] || fail "the proxy Deployment mounts no ConfigMap"
	k -n "$NS" get configmap "$PROXY_CM" -o json | jq -er '.data["config.yaml"]' >"$WORK/chart-proxy-config.yaml" ||
		fail "ConfigMap $PROXY_CM has no config.yaml"
	mapfile -t CHART_PROXY_ARGS < <(jq -r '.spec.template.spec.containers[0].args[]' <<<"$PROXY_DEPLOY")

	PODS=$(k -n "$PROXY_NAMESPACE" get pods -l "$PROXY_SELECTOR" -o json)
	want_replicas=$(jq -r .spec.replicas <<<"$PROXY_DEPLOY")
	[ "$(jq '.items | length' <<<"$PODS")" = "$want_replicas" ] ||
		fail "the operator's selector $PROXY_SELECTOR finds $(jq '.items | length' <<<"$PODS") pods, the Deployment wants $want_replicas"
	while read -r pod ip; do
		is_loopback4 "$ip" || fail "proxy pod $pod has IP $ip, not in 127.0.0.0/8"
		PROXY_PODS+=("$pod")
		PROXY_IPS+=("$ip")
	done < <(jq -r '.items[] | "\(.metadata.name) \(.status.podIP)"' <<<"$PODS")

	t=$(ms)
	for i in "${!PROXY_IPS[@]}"; do
		pod=${PROXY_PODS[$i]} ip=${PROXY_IPS[$i]}
		d=$WORK/proxy-$ip
		mkdir -p "$d"
		# In the pod 0.0.0.0 means the pod's own interfaces; here that is the pod IP.
		sed "s/0\.0\.0\.0/$ip/g" "$WORK/chart-proxy-config.yaml" >"$d/config.yaml"
		# The Record-Route key Secret volume, as the kubelet would mount it (docs/relay-policy.md).
		rk_secret=$(jq -r '.spec.template.spec.volumes[] | select(.name == "route-key") | .secret.secretName' <<<"$PROXY_DEPLOY")
		[ -n "$rk_secret" ] || fail "the proxy Deployment mounts no route-key Secret (the chart creates one by default)"
		mkdir -p "$d/route-key"
		k -n "$NS" get secret "$rk_secret" -o json | jq -r '.data | to_entries[] | "\(.key) \(.value)"' |
			while read -r key val; do base64 -d <<<"$val" >"$d/route-key/$key"; done
		chmod 600 "$d"/route-key/*
		grep -q '/etc/lb-proxy/route-key/' "$d/config.yaml" || fail "the chart's proxy config names no recordRoute.keyFile"
		sed -i "s|/etc/lb-proxy/route-key/|$d/route-key/|" "$d/config.yaml"
		args=()
		for a in "${CHART_PROXY_ARGS[@]}"; do
			case $a in --config=*) a=--config=$d/config.yaml ;; esac
			args+=("$a")
		done
		pod_env "$PROXY_DEPLOY" "$pod" "$ip" >"$d/env.all"
		mapfile -t envs <"$d/env.all"
		sed 's/\(TOKEN=\|KEY=\).*/\1<redacted>/' "$d/env.all" >"$d/env.txt"
		rm -f "$d/env.all"
		start_bg "proxy-$ip" "$d" "$d/proxy.log" env "${envs[@]}" "$LB_PROXY_BIN" "${args[@]}"
	done
	for ip in "${PROXY_IPS[@]}"; do
		for ((i = 0; ; i++)); do
			hcurl "http://$ip:$PROXY_ADMIN_PORT/healthz" >/dev/null 2>&1 && break
			alive "proxy-$ip" || fail "lb-proxy for $ip exited: $(tail -5 "$WORK/proxy-$ip/proxy.log")"
			[ "$i" -lt 100 ] || fail "lb-proxy on $ip: no /healthz after 10 s"
			sleep 0.1
		done
		code=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' -X PUT -d '{}' "http://$ip:$PROXY_ADMIN_PORT/v1/destinations")
		[ "$code" = 401 ] || fail "PUT /v1/destinations without the token on $ip: HTTP $code, want 401 (the chart's LB_PROXY_ADMIN_TOKEN not in effect?)"
		code=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' "http://$ip:$PROXY_ADMIN_PORT/readyz")
		[ "$code" = 503 ] || fail "/readyz on $ip before any destination set: HTTP $code, want 503"
	done
	pass "${#PROXY_IPS[@]} lb-proxy processes on the chart's proxy pod IPs (${PROXY_IPS[*]}): UDP+TCP :5060, admin :$PROXY_ADMIN_PORT, chart ConfigMap/args/env; 401 without token, /readyz 503 before the first set"

	# The operator as the chart's ServiceAccount: the chart's RBAC is all it gets.
	OP_SA=$(jq -r .spec.template.spec.serviceAccountName <<<"$OP_DEPLOY")
	mkdir -p "$WORK/operator"
	SA_TOKEN=$(k -n "$NS" create token "$OP_SA" --duration=2h) || fail "TokenRequest for ServiceAccount $NS/$OP_SA"
	APISERVER=$(k config view --minify -o jsonpath='{.clusters[0].cluster.server}')
	OPKC=$WORK/operator/kubeconfig
	KUBECONFIG=$OPKC k config set-cluster e2e --server="$APISERVER" --certificate-authority="$CP/pki/ca.crt" --embed-certs >/dev/null
	KUBECONFIG=$OPKC k config set-credentials "$OP_SA" --token="$SA_TOKEN" >/dev/null
	KUBECONFIG=$OPKC k config set-context e2e --cluster=e2e --user="$OP_SA" >/dev/null
	KUBECONFIG=$OPKC k config use-context e2e >/dev/null
	chmod 600 "$OPKC"

	TOKEN_SECRET=$(jq -r '.spec.template.spec.volumes[] | select(.secret) | .secret.secretName' <<<"$OP_DEPLOY" | head -1)
	TOKEN_KEY=$(jq -r '.spec.template.spec.volumes[] | select(.secret) | (.secret.items[0].key // "token")' <<<"$OP_DEPLOY" | head -1)
	(umask 077 && k -n "$NS" get secret "$TOKEN_SECRET" -o json | jq -er --arg k "$TOKEN_KEY" '.data[$k]' | base64 -d >"$WORK/operator/token") ||
		fail "admin token Secret $TOKEN_SECRET/$TOKEN_KEY"

	OP_PORT=$(free_port)
	OP_URL=http://$E2E_IP:$OP_PORT
	op_args=()
	next=""
	for a in "${CHART_OP_ARGS[@]}"; do
		case $next in
		token) a=$WORK/operator/token ;;
		listen) a=$E2E_IP:$OP_PORT ;;
		esac
		next=""
		case $a in
		--token-file=*) a=--token-file=$WORK/operator/token ;;
		--listen=*) a=--listen=$E2E_IP:$OP_PORT ;;
		--token-file) next=token ;;
		--listen) next=listen ;;
		esac
		for o in "${E2E_OPERATOR_ARGS[@]}"; do
			[ "${a%%=*}" = "${o%%=*}" ] && a=$o
		done
		op_args+=("$a")
	done
	for o in "${E2E_OPERATOR_ARGS[@]}"; do
		printf '%s\n' "${op_args[@]}" | grep -qxF -- "$o" || op_args+=("$o")
	done
	pod_env "$OP_DEPLOY" "e2e-local-operator" "$E2E_IP" >"$WORK/operator/env.txt"
	mapfile -t op_env <"$WORK/operator/env.txt"
	t=$(ms)
	start_bg operator "$WORK/operator" "$WORK/operator/operator.log" \
		env KUBECONFIG="$OPKC" "${op_env[@]}" "$LB_OPERATOR_BIN" "${op_args[@]}"
	for ((i = 0; ; i++)); do
		[ "$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' "$OP_URL/readyz")" = 200 ] && break
		alive operator || fail "lb-operator exited: $(tail -5 "$WORK/operator/operator.log")"
		[ "$i" -lt 300 ] || fail "lb-operator not ready after 30 s"
		sleep 0.1
	done
	for ip in "${PROXY_IPS[@]}"; do
		for ((i = 0; ; i++)); do
			[ "$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' "http://$ip:$PROXY_ADMIN_PORT/readyz")" = 200 ] && break
			alive operator || fail "lb-operator exited: $(tail -5 "$WORK/operator/operator.log")"
			[ "$i" -lt 300 ] || fail "proxy $ip not ready 30 s after the operator started (no set pushed?): $(tail -5 "$WORK/operator/operator.log")"
			sleep 0.1
		done
	done
	TIMINGS+=("operator start -> every proxy /readyz 200 (first set pushed): $(secs $(($(ms) - t))) s")
	lease=$LEASE_NAME
	if [ -n "$lease" ]; then
		for ((i = 0; ; i++)); do
			holder=$(k -n "$NS" get lease "$lease" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
			[ "$holder" = e2e-local-operator ] && break
			[ "$i" -lt 50 ] || fail "Lease $NS/$lease is held by '$holder', want e2e-local-operator"
			sleep 0.1
		done
	fi
	pass "lb-operator (chart args, ServiceAccount $NS/$OP_SA token, Lease ${lease:-none} held) ready; every proxy got a set and is ready"

	# The proxies the operator found: exactly the chart's proxy pods, all on loopback.
	operator_proxies() {
		jq -rR 'fromjson? | select((.fields.message // "") == "proxy found") | .fields.proxy' "$WORK/operator/operator.log" | sort -u
	}
	for ((i = 0; ; i++)); do
		found=$(operator_proxies)
		[ "$(wc -l <<<"$found")" -ge "${#PROXY_IPS[@]}" ] && [ -n "$found" ] && break
		[ "$i" -lt 50 ] || fail "the operator logged no 'proxy found' for every proxy: $found"
		sleep 0.1
	done
	want=$(for ip in "${PROXY_IPS[@]}"; do echo "http://$ip:$PROXY_ADMIN_PORT"; done | sort -u)
	[ "$found" = "$want" ] || fail "operator discovered $(echo "$found" | tr '\n' ' ')but the chart's proxy pods are $(echo "$want" | tr '\n' ' ')"
	while read -r u; do
		h=${u#http://}
		h=${h%:*}
		is_loopback4 "$h" || fail "operator discovered proxy $u outside 127.0.0.0/8"
	done <<<"$found"
	pass "operator discovered exactly the chart's proxies via '$PROXY_SELECTOR' in $PROXY_NAMESPACE: $(paste -sd' ' <<<"$found") (all 127.0.0.0/8)"
}

e2e_prometheus() {
	# Prometheus: proxies by the chart's pod annotations, the operator statically. Debian's
	# prometheus is built without kubernetes_sd_configs, so the pods go to a file_sd target file
	# with the labels Kubernetes SD (role: pod) would give them (one target per container port,
	# __meta_kubernetes_pod_*), and the usual annotation relabelling does the rest.

	PROM_PORT=${PROM_PORT:-$(free_port)} # chosen earlier when something must know it first
	PROM=http://$E2E_IP:$PROM_PORT
	mkdir -p "$WORK/prometheus/data"
	k get pods -n "$NS" -o json | jq '[.items[] | . as $p | select(($p.status.podIP // "") != "") |
		([$p.spec.containers[] | .name as $c | (.ports // [{}])[] | {container: $c, port: .}][]) as $cp |
		{targets: [if $cp.port.containerPort then "\($p.status.podIP):\($cp.port.containerPort)" else $p.status.podIP end],
		 labels: ({
			__meta_kubernetes_namespace: $p.metadata.namespace,
			__meta_kubernetes_pod_name: $p.metadata.name,
			__meta_kubernetes_pod_ip: $p.status.podIP,
			__meta_kubernetes_pod_phase: ($p.status.phase // ""),
			__meta_kubernetes_pod_node_name: ($p.spec.nodeName // ""),
			__meta_kubernetes_pod_container_name: $cp.container,
			__meta_kubernetes_pod_container_port_name: ($cp.port.name // ""),
			__meta_kubernetes_pod_container_port_number: ($cp.port.containerPort // "" | tostring),
			__meta_kubernetes_pod_container_port_protocol: ($cp.port.protocol // "")}
		  + ($p.metadata.annotations // {} | with_entries(.key |= "__meta_kubernetes_pod_annotation_" + gsub("[^a-zA-Z0-9_]"; "_")))
		  + ($p.metadata.labels // {} | with_entries(.key |= "__meta_kubernetes_pod_label_" + gsub("[^a-zA-Z0-9_]"; "_"))))}]' \
		>"$WORK/prometheus/pods.json"
	cat >"$WORK/prometheus/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  # The usual annotation-driven pod scraping (prometheus.io/scrape, /port, /path).
  - job_name: kubernetes-pods
    file_sd_configs:
      - files: ["$WORK/prometheus/pods.json"]
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
        action: keep
        regex: "true"
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
        action: replace
        target_label: __metrics_path__
        regex: (.+)
      - source_labels: [__meta_kubernetes_pod_ip, __meta_kubernetes_pod_annotation_prometheus_io_port]
        action: replace
        regex: (.+);(\d+)
        replacement: \$1:\$2
        target_label: __address__
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
        target_label: component
  # The chart's operator pod is only simulated; the real one runs on this machine.
  - job_name: lb-operator
    static_configs:
      - targets: ["$E2E_IP:$OP_PORT"]
        labels: {component: operator}
EOF
	promtool check config "$WORK/prometheus/prometheus.yml" >"$WORK/prometheus/check.log" 2>&1 || {
		cat "$WORK/prometheus/check.log" >&2
		fail "promtool check config"
	}
	start_bg prometheus "$WORK/prometheus" "$WORK/prometheus/prometheus.log" \
		prometheus --config.file="$WORK/prometheus/prometheus.yml" --storage.tsdb.path="$WORK/prometheus/data" \
		--web.listen-address="$E2E_IP:$PROM_PORT" --storage.tsdb.retention.time=1h
	for ((i = 0; ; i++)); do
		hcurl "$PROM/-/ready" >/dev/null 2>&1 && break
		alive prometheus || fail "prometheus exited: $(tail -5 "$WORK/prometheus/prometheus.log")"
		[ "$i" -lt 300 ] || fail "prometheus not ready after 30 s"
		sleep 0.1
	done
	log "prometheus at $PROM"
}

# ---------------------------------------------------------------------------------------------
# MRCP servers (sipp), the proxies' views, sipp clients.

start_uas() { # POD IP: a sipp MRCP server on IP:SIP_PORT, as the pod's UniMRCP server
	local pod=$1 ip=$2 d cp mp
	is_loopback4 "$ip" || fail "MRCP server pod $pod has IP $ip, not in 127.0.0.0/8"
	d=$WORK/uas-$pod-$ip
	mkdir -p "$d"
	cp=$(udp_ports "$ip" 1)
	mp=$(udp_ports "$ip" 4)
	start_bg "uas-$pod" "$d" "$d/screen.log" sipp -sf "$ROOT/tests/sipp/uas.xml" \
		-i "$ip" -p "$SIP_PORT" -t u1 -ci "$ip" -cp "$cp" -mi "$ip" -mp "$mp" \
		-nostdin -trace_err -error_file "$d/errors.log" -trace_stat -stf "$d/stat.csv" -fd 1 -trace_counts
	SIPP_IP[$pod]=$ip
}
wait_uas() { # POD: until its sipp server has bound its port (it writes its first statistics row)
	local pod=$1 ip=${SIPP_IP[$1]} d i
	d=$WORK/uas-$pod-$ip
	for ((i = 0; ; i++)); do
		[ -f "$d/stat.csv" ] && [ "$(wc -l <"$d/stat.csv")" -ge 2 ] && break
		alive "uas-$pod" || fail "sipp server for $pod ($ip) exited: $(tail -3 "$d/screen.log")"
		[ "$i" -lt 200 ] || fail "sipp server for $pod ($ip) did not start in 10 s"
		sleep 0.05
	done
	log "sipp server up for pod $pod on $ip:$SIP_PORT"
}

sync_uas() { # PODS_JSON: a sipp server for every pod with an IP, none for pods gone
	local name ip
	local -A wanted=()
	while read -r name ip; do
		[ -n "$name" ] && wanted[$name]=$ip
	done < <(jq -r '.items[] | select((.status.podIP // "") != "") | "\(.metadata.name) \(.status.podIP)"' <<<"$1")
	for name in "${!SIPP_IP[@]}"; do
		if [ "${wanted[$name]:-}" != "${SIPP_IP[$name]}" ]; then
			stop_bg "uas-$name" 5
			log "sipp server for pod $name (${SIPP_IP[$name]}) stopped: pod gone"
			unset "SIPP_IP[$name]"
		fi
	done
	local new=()
	for name in "${!wanted[@]}"; do
		[ -n "${SIPP_IP[$name]:-}" ] && continue
		start_uas "$name" "${wanted[$name]}"
		new+=("$name")
	done
	for name in "${new[@]}"; do wait_uas "$name"; done
}

proxy_json() { hcurl "http://$1:$PROXY_ADMIN_PORT/v1/destinations"; }
# A proxy's destinations reduced to what the pods determine.
view_of() {
	jq -c '[.destinations[] | {id, state, resources: ([.resources[] | "\(.name)=\(.capacity)"] | join(";")), removed}] | sort_by(.id)'
}

LOOPBACK_CHECKED=0
check_loopback() { # PROXY_IP: every destination URI host and resolved address in 127.0.0.0/8
	local json id uri addr h
	json=$(proxy_json "$1") || fail "GET /v1/destinations on $1"
	while read -r id uri addr; do
		[ -n "$id" ] || continue
		h=${uri#*:}
		h=${h%%;*}
		h=${h#*@}
		h=${h%:*}
		is_loopback4 "$h" || fail "proxy $1: destination $id has URI $uri outside 127.0.0.0/8"
		[ "$addr" = - ] && fail "proxy $1: destination $id has no resolved address"
		is_loopback4 "${addr%:*}" || fail "proxy $1: destination $id resolves to $addr, outside 127.0.0.0/8"
		LOOPBACK_CHECKED=$((LOOPBACK_CHECKED + 1))
	done < <(jq -r '.destinations[] | "\(.id) \(.uri) \(.address // "-")"' <<<"$json")
}


sipp_col() { # CSV COLUMN: the value of COLUMN in the last row of a sipp -trace_stat file
	awk -F';' -v c="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == c) col = i } END { if (col) print $col }' "$1"
}

start_client() { # NAME PROXY_IP CALLS RATE PAUSE_MS: sipp uac.xml through PROXY_IP:5060, in the
	# background (CALLS calls, RATE new calls per second, each held PAUSE_MS before its BYE)
	local name=$1 target=$2 calls=$3 rate=$4 pause=$5 d
	d=$WORK/$name
	mkdir -p "$d"
	CLIENT_CALLS[$name]=$calls
	CLIENT_TARGET[$name]=$target
	start_bg "$name" "$d" "$d/screen.log" sipp -sf "$ROOT/tests/sipp/uac.xml" \
		-i "$E2E_IP" -p "$(udp_ports "$E2E_IP" 1)" -t u1 -ci "$E2E_IP" -cp "$(udp_ports "$E2E_IP" 1)" \
		-mi "$E2E_IP" -mp "$(udp_ports "$E2E_IP" 4)" \
		-m "$calls" -r "$rate" -l 50 -d "$pause" -timeout "$((calls / rate + pause / 1000 + 30))s" -timeout_error \
		-nostdin -trace_err -error_file "$d/errors.log" -trace_stat -stf "$d/stat.csv" -fd 1 \
		"$target:5060"
}
declare -A CLIENT_CALLS=() CLIENT_TARGET=()

wait_client() { # NAME: until the client started by start_client ends; all its calls must succeed
	local name=$1 d=$WORK/$1 calls=${CLIENT_CALLS[$1]} rc ok failed
	rc=0
	wait "${PID_OF[$name]}" || rc=$?
	unset "PID_OF[$name]"
	ok=$(sipp_col "$d/stat.csv" 'SuccessfulCall(C)')
	failed=$(sipp_col "$d/stat.csv" 'FailedCall(C)')
	[ "$rc" = 0 ] && [ "$ok" = "$calls" ] && [ "$failed" = 0 ] ||
		fail "sipp client $name via ${CLIENT_TARGET[$name]}: exit $rc, $ok/$calls successful, $failed failed ($d; $(tail -3 "$d/errors.log" 2>/dev/null))"
}

run_client() { # NAME PROXY_IP CALLS RATE PAUSE_MS: start_client, then wait_client
	start_client "$@"
	wait_client "$1"
}

