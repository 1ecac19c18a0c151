# shellcheck shell=bash
# Source this to get the paths of the binaries that tests/k8s/build.sh caches:
#
#   source tests/k8s/env.sh
#   "$KUBECTL" version --client
#
# Exports KUBE_APISERVER KUBE_CONTROLLER_MANAGER KUBE_SCHEDULER KUBECTL ETCD
# ETCDCTL KWOK KWOKCTL HELM CRANE KEDA_OPERATOR KEDA_ADAPTER (and KEDA_CRDS, KEDA's CRDs
# in one file next to keda-operator), KUBEBUILDER_ASSETS (etcd, kube-apiserver, kubectl
# side by side, as envtest wants) with controller-runtime's TEST_ASSET_*
# equivalents, and K8S_VERSIONS (a summary). It only points at the cache:
# missing binaries are reported, not built (run tests/k8s/build.sh).
# For kwokctl it sets KWOK_KUBE_VERSION and the KWOK_*_BINARY variables so that
# `kwokctl create cluster --runtime binary` uses these binaries and downloads nothing.

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export KUBE_APISERVER KUBE_CONTROLLER_MANAGER KUBE_SCHEDULER KUBECTL ETCD ETCDCTL KWOK KWOKCTL HELM
KUBE_APISERVER=$(k8s_bin kube-apiserver)
KUBE_CONTROLLER_MANAGER=$(k8s_bin kube-controller-manager)
KUBE_SCHEDULER=$(k8s_bin kube-scheduler)
KUBECTL=$(k8s_bin kubectl)
ETCD=$(k8s_bin etcd)
ETCDCTL=$(k8s_bin etcdctl)
KWOK=$(k8s_bin kwok)
KWOKCTL=$(k8s_bin kwokctl)
HELM=$(k8s_bin helm)
export CRANE
CRANE=$(k8s_bin crane)
export KEDA_OPERATOR KEDA_ADAPTER KEDA_CRDS
KEDA_OPERATOR=$(k8s_bin keda-operator)
KEDA_ADAPTER=$(k8s_bin keda-adapter)
KEDA_CRDS=$(dirname "$KEDA_OPERATOR")/crds.yaml

export KUBEBUILDER_ASSETS=$K8S_ASSETS
export TEST_ASSET_KUBE_APISERVER=$KUBE_APISERVER TEST_ASSET_ETCD=$ETCD TEST_ASSET_KUBECTL=$KUBECTL

export KWOK_KUBE_VERSION=$KUBE_VERSION
export KWOK_KUBE_APISERVER_BINARY=$KUBE_APISERVER KWOK_KUBE_CONTROLLER_MANAGER_BINARY=$KUBE_CONTROLLER_MANAGER
export KWOK_KUBE_SCHEDULER_BINARY=$KUBE_SCHEDULER KWOK_KUBECTL_BINARY=$KUBECTL
export KWOK_ETCD_BINARY=$ETCD KWOK_CONTROLLER_BINARY=$KWOK

export K8S_VERSIONS="kubernetes $KUBE_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION, helm $HELM_VERSION, keda $KEDA_VERSION, crane $CRANE_VERSION"

for _k8s_b in $K8S_BINARIES; do
	[ -x "$(k8s_bin "$_k8s_b")" ] || echo "tests/k8s/env.sh: $(k8s_bin "$_k8s_b") not built yet (run tests/k8s/build.sh)" >&2
done
unset _k8s_b
