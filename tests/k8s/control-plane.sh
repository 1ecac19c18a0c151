#!/usr/bin/env bash
# Start/stop a real, local Kubernetes control plane for tests, from the binaries
# that tests/k8s/build.sh caches. Everything listens on 127.0.0.1 only.
#
#   tests/k8s/control-plane.sh start DIR [--full] [--nodes N]
#   tests/k8s/control-plane.sh stop DIR
#   tests/k8s/control-plane.sh status DIR
#
# start: etcd + kube-apiserver (client-cert auth, RBAC, self-made CA). With
#   --full also kube-controller-manager, kube-scheduler and kwok, plus N fake
#   nodes (default 1) that kwok keeps Ready and whose pods it marks Running/Ready
#   with pod IPs from the node's podCIDR: 127.1.<i>.0/24, inside loopback.
#   Writes DIR/kubeconfig (cluster-admin), DIR/<component>.pid, DIR/<component>.log,
#   DIR/env (KUBECONFIG, ports) and returns once the API server is ready (and,
#   with --full, the nodes are Ready). DIR/audit.log gets one JSON line per
#   request made as a ServiceAccount (metadata only): what a component running
#   under the chart's RBAC actually called. Ports are picked free at random unless
#   ETCD_PORT / APISERVER_PORT are set.
# stop: kills the PIDs in DIR/*.pid (TERM, then KILL after 10 s) and removes the
#   pid files; DIR itself (data, logs, certificates) is left for inspection.
#
# Service ClusterIPs come from 127.2.0.0/16 (override: SERVICE_CIDR), so no
# address that a component or test might dial lies outside loopback.
#
# API aggregation: the API server always runs with the aggregation layer's flags
# (a front-proxy CA, DIR/pki/front-proxy-ca.crt, signs the client certificate it
# presents to extension API servers; --requestheader-* tell those servers whom to
# trust, via the kube-system/extension-apiserver-authentication ConfigMap). It
# dials an APIService's Service at its ClusterIP:port (no kube-proxy here), so an
# extension API server run on the host listens on exactly that address.
# --full: kube-controller-manager runs the HPA controller with a 2 s sync period
# (HPA_SYNC_PERIOD; upstream's default is 15 s) so that autoscaling tests are quick.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,33p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "control-plane.sh: $*" >&2; exit 1; }
log() { echo "control-plane: $*" >&2; }

# Order matters: stop goes through it backwards.
COMPONENTS="etcd kube-apiserver kube-controller-manager kube-scheduler kwok"

free_port() {
	if command -v python3 >/dev/null; then
		python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
	else
		local p
		while :; do
			p=$((20000 + RANDOM % 20000))
			ss -Hltn "sport = :$p" | grep -q . || { echo "$p"; return; }
		done
	fi
}

alive() { # PIDFILE BINARY: the pid in PIDFILE runs BINARY
	local pid
	pid=$(cat "$1" 2>/dev/null) || return 1
	[ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
	tr '\0' '\n' <"/proc/$pid/cmdline" | head -1 | grep -q -- "$2\$"
}

launch() { # NAME ARGS...: start a cached binary in the background
	local name=$1 bin
	shift
	bin=$(k8s_bin "$name")
	"$bin" "$@" </dev/null >"$DIR/$name.log" 2>&1 &
	echo $! >"$DIR/$name.pid"
	log "started $name (pid $!), log $DIR/$name.log"
}

wait_for() { # WHAT SECONDS COMPONENT COMMAND...: poll COMMAND until it succeeds;
	# fail at once if COMPONENT (one of ours, or "-") has died meanwhile.
	local what=$1 deadline=$((SECONDS + $2)) comp=$3
	shift 3
	until "$@" >/dev/null 2>&1; do
		if [ "$comp" != - ] && ! alive "$DIR/$comp.pid" "$comp"; then
			tail -5 "$DIR/$comp.log" >&2 || true
			die "$comp exited while waiting for $what (log: $DIR/$comp.log)"
		fi
		[ "$SECONDS" -lt "$deadline" ] || die "timed out after ${2}s waiting for $what (logs in $DIR)"
		sleep 0.2
	done
}

gen_pki() {
	local p=$DIR/pki
	[ -f "$p/admin.crt" ] && [ -f "$p/front-proxy-client.crt" ] && return 0
	mkdir -p "$p"
	log "generating certificates in $p"
	(
		cd "$p"
		umask 077
		ec() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" 2>/dev/null; }
		mkca() { # NAME CN
			ec "$1.key"
			openssl req -x509 -new -key "$1.key" -sha256 -days 3650 -subj "/CN=$2" \
				-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
				-out "$1.crt" 2>/dev/null
		}
		sign() { # NAME SUBJ EXT [CA]
			local ca=${4:-ca}
			ec "$1.key"
			openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
			printf '%s\n' "$3" >"$1.ext"
			openssl x509 -req -in "$1.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -sha256 \
				-days 3650 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
			rm -f "$1.csr" "$1.ext"
		}
		# The aggregation layer's own CA and client certificate (a DIR made by an
		# older control-plane.sh gets them on its next start).
		mkca front-proxy-ca mrcp-lb-test-front-proxy-ca
		sign front-proxy-client "/CN=front-proxy-client" "$(printf '%s\n' \
			"basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
			"extendedKeyUsage=clientAuth")" front-proxy-ca
		chmod 0644 front-proxy-ca.crt front-proxy-client.crt
		[ -f admin.crt ] && exit 0
		mkca ca mrcp-lb-test-ca
		sign apiserver "/CN=kube-apiserver" "$(printf '%s\n' \
			"basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
			"extendedKeyUsage=serverAuth" \
			"subjectAltName=IP:127.0.0.1,IP:${SERVICE_CIDR_FIRST_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")"
		sign admin "/O=system:masters/CN=mrcp-lb-test-admin" "$(printf '%s\n' \
			"basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
			"extendedKeyUsage=clientAuth")"
		ec sa.key
		openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
		chmod 0644 ca.crt apiserver.crt admin.crt sa.pub
	)
}

write_kubeconfig() {
	local p=$DIR/pki
	cat >"$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mrcp-lb-test
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 "$p/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 "$p/admin.crt")
    client-key-data: $(base64 -w0 "$p/admin.key")
contexts:
- name: mrcp-lb-test
  context: {cluster: mrcp-lb-test, user: admin}
current-context: mrcp-lb-test
EOF
	chmod 0600 "$DIR/kubeconfig"
}

kubectl_() { "$(k8s_bin kubectl)" --kubeconfig "$DIR/kubeconfig" "$@"; }

start_kwok_and_nodes() {
	local kwok_dir i node
	kwok_dir=$(dirname "$(k8s_bin kwok)")
	[ -f "$kwok_dir/stages.yaml" ] || die "$kwok_dir/stages.yaml missing: run tests/k8s/build.sh kwok"
	launch kwok --kubeconfig "$DIR/kubeconfig" --config "$kwok_dir/stages.yaml" \
		--manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
		--cidr 127.1.255.0/24 --node-ip 127.0.0.1 --node-port "$KWOK_PORT" \
		--server-address "127.0.0.1:$KWOK_PORT" --node-lease-duration-seconds 40
	for ((i = 0; i < NODES; i++)); do
		node=kwok-node-$i
		kubectl_ apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $node
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: $node
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
spec:
  podCIDR: 127.1.$i.0/24
  podCIDRs: [127.1.$i.0/24]
status:
  addresses:
  - {type: InternalIP, address: 127.0.0.1}
  - {type: Hostname, address: $node}
  allocatable: {cpu: "32", memory: 64Gi, pods: "110"}
  capacity: {cpu: "32", memory: 64Gi, pods: "110"}
EOF
	done
	nodes_ready() { [ "$(kubectl_ get nodes -l type=kwok -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)" -ge "$NODES" ]; }
	wait_for "kwok nodes Ready" 60 kwok nodes_ready
	log "$NODES fake node(s) Ready (pod IPs from 127.1.<i>.0/24)"
}

cmd_start() {
	local full=false i
	NODES=1
	while [ $# -gt 0 ]; do
		case $1 in
		--full) full=true ;;
		--nodes) NODES=$2; shift ;;
		*) usage ;;
		esac
		shift
	done
	for b in etcd kube-apiserver kubectl; do
		[ -x "$(k8s_bin $b)" ] || die "$(k8s_bin $b) missing: run tests/k8s/build.sh"
	done
	if $full; then
		for b in kube-controller-manager kube-scheduler kwok; do
			[ -x "$(k8s_bin $b)" ] || die "$(k8s_bin $b) missing: run tests/k8s/build.sh"
		done
	fi
	for b in openssl curl base64; do command -v $b >/dev/null || die "$b is needed"; done
	mkdir -p "$DIR"
	DIR=$(cd "$DIR" && pwd)
	for c in $COMPONENTS; do
		if alive "$DIR/$c.pid" "$c"; then die "$c already running in $DIR (pid $(cat "$DIR/$c.pid")); stop it first"; fi
	done

	SERVICE_CIDR=${SERVICE_CIDR:-127.2.0.0/16}
	SERVICE_CIDR_FIRST_IP=$(python3 -c "import ipaddress,sys; print(ipaddress.ip_network(sys.argv[1])[1])" "$SERVICE_CIDR" 2>/dev/null ||
		echo "${SERVICE_CIDR%.*/*}.1")
	# A restart in the same DIR keeps the ports (etcd's data remembers its peer URL).
	if [ -f "$DIR/env" ]; then
		eval "$(grep -E '^(ETCD_PORT|ETCD_PEER_PORT|APISERVER_PORT|KWOK_PORT)=[0-9]+$' "$DIR/env" |
			sed 's/^\([A-Z_]*\)=\(.*\)$/\1=${\1:-\2}/')"
	fi
	ETCD_PORT=${ETCD_PORT:-$(free_port)}
	ETCD_PEER_PORT=${ETCD_PEER_PORT:-$(free_port)}
	APISERVER_PORT=${APISERVER_PORT:-$(free_port)}
	KWOK_PORT=${KWOK_PORT:-$(free_port)}
	gen_pki
	write_kubeconfig
	cat >"$DIR/env" <<EOF
export KUBECONFIG=$DIR/kubeconfig
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
APISERVER_PORT=$APISERVER_PORT
KWOK_PORT=$KWOK_PORT
SERVICE_CIDR=$SERVICE_CIDR
EOF

	# If anything below fails, stop what was started.
	CP_UP=false
	trap 'if ! $CP_UP; then log "start failed; stopping what was started"; cmd_stop; fi' EXIT

	launch etcd --name test --data-dir "$DIR/etcd-data" \
		--listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
		--listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster "test=http://127.0.0.1:$ETCD_PEER_PORT" \
		--unsafe-no-fsync --log-level warn
	wait_for "etcd" 30 etcd curl -fsS --max-time 2 --noproxy '*' "http://127.0.0.1:$ETCD_PORT/health"

	local p=$DIR/pki
	# Audit ServiceAccount requests only (the admin's are not logged): tests read it to see
	# which verbs and resources a component used and what the API server answered.
	cat >"$DIR/audit-policy.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
EOF
	launch kube-apiserver --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
		--advertise-address 127.0.0.1 --bind-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
		--tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
		--client-ca-file "$p/ca.crt" \
		--service-account-issuer https://kubernetes.default.svc.cluster.local \
		--service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
		--service-cluster-ip-range "$SERVICE_CIDR" \
		--endpoint-reconciler-type none \
		--authorization-mode RBAC --allow-privileged=true --profiling=false \
		--requestheader-client-ca-file "$p/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
		--requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
		--requestheader-extra-headers-prefix X-Remote-Extra- \
		--proxy-client-cert-file "$p/front-proxy-client.crt" --proxy-client-key-file "$p/front-proxy-client.key" \
		--audit-policy-file "$DIR/audit-policy.yaml" --audit-log-path "$DIR/audit.log" \
		--audit-log-format json --audit-log-mode blocking
	wait_for "kube-apiserver /readyz" 120 kube-apiserver \
		curl -fsS --max-time 2 --noproxy '*' --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" \
		"https://127.0.0.1:$APISERVER_PORT/readyz"
	log "kube-apiserver ready at https://127.0.0.1:$APISERVER_PORT"

	if $full; then
		launch kube-controller-manager --kubeconfig "$DIR/kubeconfig" \
			--bind-address 127.0.0.1 --secure-port 0 --leader-elect=false \
			--service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
			--cluster-signing-cert-file "$p/ca.crt" --cluster-signing-key-file "$p/ca.key" \
			--use-service-account-credentials=false --profiling=false \
			--horizontal-pod-autoscaler-sync-period "${HPA_SYNC_PERIOD:-2s}"
		cat >"$DIR/kube-scheduler.yaml" <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: $DIR/kubeconfig
leaderElection:
  leaderElect: false
EOF
		launch kube-scheduler --config "$DIR/kube-scheduler.yaml" --bind-address 127.0.0.1 --secure-port 0
		start_kwok_and_nodes
		# The ServiceAccount admission plugin rejects pods until the controller
		# manager has made the namespace's default ServiceAccount.
		wait_for "default ServiceAccount" 60 kube-controller-manager kubectl_ -n default get serviceaccount default
	fi
	for c in $COMPONENTS; do
		if [ -f "$DIR/$c.pid" ] && ! alive "$DIR/$c.pid" "$c"; then
			tail -5 "$DIR/$c.log" >&2 || true
			die "$c exited (log: $DIR/$c.log)"
		fi
	done
	CP_UP=true
	log "up; use: export KUBECONFIG=$DIR/kubeconfig   (stop: $0 stop $DIR)"
}

cmd_stop() {
	local c pid i stopped=0 rev=""
	[ -d "$DIR" ] || return 0
	for c in $COMPONENTS; do rev="$c $rev"; done
	for c in $rev; do
		[ -f "$DIR/$c.pid" ] || continue
		if alive "$DIR/$c.pid" "$c"; then
			pid=$(cat "$DIR/$c.pid")
			kill -TERM "$pid" 2>/dev/null || true
			for ((i = 0; i < 50; i++)); do
				alive "$DIR/$c.pid" "$c" || break
				sleep 0.2
			done
			if alive "$DIR/$c.pid" "$c"; then kill -KILL "$pid" 2>/dev/null || true; fi
			log "stopped $c (pid $pid)"
			stopped=$((stopped + 1))
		fi
		rm -f "$DIR/$c.pid"
	done
	[ "$stopped" -gt 0 ] || log "nothing running in $DIR"
}

cmd_status() {
	local c rc=0
	for c in $COMPONENTS; do
		[ -f "$DIR/$c.pid" ] || continue
		if alive "$DIR/$c.pid" "$c"; then echo "$c running (pid $(cat "$DIR/$c.pid"))"; else echo "$c dead"; rc=1; fi
	done
	return $rc
}

[ $# -ge 2 ] || usage
action=$1
DIR=$2
shift 2
case $action in
start) cmd_start "$@" ;;
stop) [ $# -eq 0 ] || usage; cmd_stop ;;
status) cmd_status ;;
*) usage ;;
esac
