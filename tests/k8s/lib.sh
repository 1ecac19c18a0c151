# shellcheck shell=bash
# Shared by build.sh, env.sh and control-plane.sh: versions (read from the
# committed wrapper go.mod files) and cache paths. Source it; it defines
# functions and K8S_* variables only.

K8S_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_CACHE=${MRCP_LB_CACHE:-$HOME/.cache/mrcp-lb}/k8s

# k8s_modver WRAPPER MODULE: the version of MODULE required by tests/k8s/WRAPPER/go.mod.
k8s_modver() {
	awk -v m="$2" '$0 !~ /=>/ { for (i = 1; i < NF; i++) if ($i == m) { print $(i + 1); exit } }' \
		"$K8S_DIR/$1/go.mod"
}

KUBE_VERSION=$(k8s_modver kube k8s.io/kubernetes)
ETCD_VERSION=$(k8s_modver etcd go.etcd.io/etcd/server/v3)
KWOK_VERSION=$(k8s_modver kwok sigs.k8s.io/kwok)
HELM_VERSION=$(k8s_modver helm helm.sh/helm/v3)
KEDA_VERSION=$(k8s_modver keda github.com/kedacore/keda/v2)
CRANE_VERSION=$(k8s_modver crane github.com/google/go-containerregistry)

# k8s_version_of BINARY: the version its cache entry is keyed by.
k8s_version_of() {
	case $1 in
	kube-apiserver | kube-controller-manager | kube-scheduler | kubectl) echo "$KUBE_VERSION" ;;
	etcd | etcdctl) echo "$ETCD_VERSION" ;;
	kwok | kwokctl) echo "$KWOK_VERSION" ;;
	helm) echo "$HELM_VERSION" ;;
	keda-operator | keda-adapter) echo "$KEDA_VERSION" ;;
	crane) echo "$CRANE_VERSION" ;;
	*) return 1 ;;
	esac
}

# k8s_bin BINARY: path of the cached binary (it may not exist yet).
k8s_bin() { echo "$K8S_CACHE/$1-$(k8s_version_of "$1")/$1"; }

# shellcheck disable=SC2034 # used by the scripts that source this
# Directory with etcd, kube-apiserver and kubectl, as controller-runtime's
# envtest (and the envtest crate) expect in KUBEBUILDER_ASSETS.
K8S_ASSETS="$K8S_CACHE/kubebuilder-assets-$KUBE_VERSION-etcd-$ETCD_VERSION"

# shellcheck disable=SC2034
K8S_BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubectl etcd etcdctl kwok kwokctl helm keda-operator keda-adapter crane"
