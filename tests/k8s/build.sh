#!/usr/bin/env bash
# Build the Kubernetes test binaries from the Go module proxy and cache them
# outside the repo, keyed by version:
#
#   ${MRCP_LB_CACHE:-$HOME/.cache/mrcp-lb}/k8s/<binary>-<version>/<binary>
#
#   tests/k8s/build.sh [BINARY...]     (default: all of them)
#   FORCE=1 tests/k8s/build.sh kubectl  (rebuild even if cached)
#
# Binaries: kube-apiserver kube-controller-manager kube-scheduler kubectl
# (k8s.io/kubernetes), etcd etcdctl (go.etcd.io/etcd), kwok kwokctl
# (sigs.k8s.io/kwok), helm (helm.sh/helm/v3), keda-operator keda-adapter
# (github.com/kedacore/keda/v2 cmd/operator and cmd/adapter, built by one `go
# build` so that the packages they share are compiled once; KEDA's CRDs go to
# crds.yaml next to keda-operator), crane (github.com/google/go-containerregistry,
# for `make image`: OCI images without a Docker daemon). The versions are the ones the wrapper modules
# tests/k8s/{kube,etcd,kwok,helm,keda,crane}/go.mod require; change them with
# tests/k8s/update-wrappers.sh.
#
# A cache entry counts as done when the binary and its .stamp file exist, so
# the script is idempotent and an interrupted build is redone. Builds run under
# `nice -n 19` with `go build -p 1` so they stay out of the way of other work on
# a small machine; the first kube build takes a long time (tens of minutes on 2
# cores), later ones reuse Go's build cache. Nothing is written into the repo.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }
mkdir -p "$K8S_CACHE"
exec 9>"$K8S_CACHE/.build.lock"
flock 9 # one build.sh at a time per cache

# Commit time of a module version, from the proxy's .info (used as buildDate so
# that the binaries are reproducible).
mod_time() {
	local info
	info=$(cd "$K8S_DIR/$1" && go mod download -json "$2@$3" | sed -n 's/^\t"Info": "\(.*\)",$/\1/p')
	sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info"
}

kube_ldflags() {
	local v=$KUBE_VERSION date major minor p flags="-s -w"
	date=$(mod_time kube k8s.io/kubernetes "$v")
	major=${v#v}; major=${major%%.*}
	minor=${v#v*.}; minor=${minor%%.*}
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		flags+=" -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor"
		flags+=" -X $p.gitTreeState=clean -X $p.buildDate=$date -X $p.gitCommit="
	done
	echo "$flags"
}

helm_ldflags() {
	# As helm's Makefile: the default Kubernetes version (used by `helm template`
	# and `helm lint` without a cluster) follows the client-go it is built with.
	local cg major minor p flags="-s -w"
	cg=$(k8s_modver helm k8s.io/client-go) # v0.37.0 -> 1.37
	cg=${cg#v}
	major=$((${cg%%.*} + 1))
	cg=${cg#*.}
	minor=${cg%%.*}
	flags+=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
	flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
	for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
		flags+=" -X $p.k8sVersionMajor=$major -X $p.k8sVersionMinor=$minor"
	done
	echo "$flags"
}

# wrapper, Go package and ldflags of each binary.
wrapper_of() {
	case $1 in
	kube-* | kubectl) echo kube ;; etcd | etcdctl) echo etcd ;; kwok | kwokctl) echo kwok ;; helm) echo helm ;;
	keda-*) echo keda ;;
	crane) echo crane ;;
	esac
}
package_of() {
	case $1 in
	kube-* | kubectl) echo "k8s.io/kubernetes/cmd/$1" ;;
	etcd) echo go.etcd.io/etcd/server/v3 ;;
	etcdctl) echo go.etcd.io/etcd/etcdctl/v3 ;;
	kwok | kwokctl) echo "sigs.k8s.io/kwok/cmd/$1" ;;
	helm) echo helm.sh/helm/v3/cmd/helm ;;
	keda-operator) echo github.com/kedacore/keda/v2/cmd/operator ;;
	keda-adapter) echo github.com/kedacore/keda/v2/cmd/adapter ;;
	crane) echo github.com/google/go-containerregistry/cmd/crane ;;
	esac
}
ldflags_of() {
	case $1 in
	kube-* | kubectl) kube_ldflags ;;
	etcd | etcdctl) echo "-s -w" ;; # etcd's version is a constant in its source
	kwok | kwokctl) echo "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" ;;
	helm) helm_ldflags ;;
	keda-*) echo "-s -w -X github.com/kedacore/keda/v2/version.Version=$KEDA_VERSION" ;;
	crane) echo "-s -w -X github.com/google/go-containerregistry/cmd/crane/cmd.Version=$CRANE_VERSION" ;;
	esac
}

# Binaries built by the same `go build` as NAME (they share most packages).
siblings_of() {
	case $1 in
	keda-*) echo keda-operator keda-adapter ;;
	*) echo "$1" ;;
	esac
}

# kwok reads its Stage objects (the fake node/pod lifecycles) from --config
# files; kwokctl embeds the same defaults. Write them next to the binary, from
# the kwok module the binary was built from.
kwok_stages() {
	local src out=$1
	src=$(cd "$K8S_DIR/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage
	{
		echo "# Default kwok stages (as kwokctl uses them), from sigs.k8s.io/kwok $KWOK_VERSION:"
		echo "# node/fast, node/heartbeat-with-lease, pod/fast."
		for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
			pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
			echo "---"
			grep -v '^---$' "$src/$f"
		done
	} >"$out"
}

# KEDA's CRDs (ScaledObject, ...), from the module the binaries were built from.
keda_crds() {
	local src out=$1 f
	src=$(cd "$K8S_DIR/keda" && go list -m -f '{{.Dir}}' github.com/kedacore/keda/v2)/config/crd/bases
	{
		echo "# KEDA's CRDs, from github.com/kedacore/keda/v2 $KEDA_VERSION config/crd/bases."
		for f in "$src"/*.yaml; do
			echo "---"
			grep -v '^---$' "$f"
		done
	} >"$out"
}

cached() { # NAME: its cache entry is complete
	local bin dir
	bin=$(k8s_bin "$1")
	dir=$(dirname "$bin")
	[ -x "$bin" ] && [ -f "$dir/.stamp" ] &&
		{ [ "$1" != kwok ] || [ -f "$dir/stages.yaml" ]; } &&
		{ [ "$1" != keda-operator ] || [ -f "$dir/crds.yaml" ]; }
}

build_one() {
	local name=$1 names n version wrapper ldflags t0 secs tmpdir out pkgs=() bin dir
	version=$(k8s_version_of "$name")
	if cached "$name" && [ -z "${FORCE:-}" ]; then
		echo "cached   $name $version  $(k8s_bin "$name")"
		return
	fi
	# Siblings are built together (one `go build` of several packages compiles the
	# packages they share once), unless one is cached and not asked to be rebuilt.
	names=""
	for n in $(siblings_of "$name"); do
		if [ "$n" = "$name" ] || ! cached "$n" || [ -n "${FORCE:-}" ]; then
			names+=" $n"
			pkgs+=("$(package_of "$n")")
		fi
	done
	wrapper=$(wrapper_of "$name")
	ldflags=$(ldflags_of "$name")
	echo "building$names $version  (${pkgs[*]}, wrapper tests/k8s/$wrapper) ..."
	for n in $names; do
		dir=$(dirname "$(k8s_bin "$n")")
		mkdir -p "$dir"
		rm -f "$dir/.stamp"
	done
	tmpdir=$(mktemp -d "$K8S_CACHE/.build.XXXXXX")
	t0=$(date +%s)
	# One package: -o FILE. Several: -o DIR/ writes one binary per package, named
	# after the package's last path element (cmd/operator -> operator).
	out="$tmpdir/"
	if [ ${#pkgs[@]} -eq 1 ]; then out=$tmpdir/${pkgs[0]##*/}; fi
	if ! (cd "$K8S_DIR/$wrapper" &&
		CGO_ENABLED=0 nice -n 19 go build -p "${K8S_BUILD_JOBS:-1}" -trimpath -ldflags "$ldflags" -o "$out" "${pkgs[@]}"); then
		rm -rf "$tmpdir"
		return 1
	fi
	secs=$(($(date +%s) - t0))
	for n in $names; do
		bin=$(k8s_bin "$n")
		dir=$(dirname "$bin")
		chmod 0755 "$tmpdir/$(basename "$(package_of "$n")")"
		mv -f "$tmpdir/$(basename "$(package_of "$n")")" "$bin"
		if [ "$n" = kwok ]; then kwok_stages "$dir/stages.yaml"; fi
		if [ "$n" = keda-operator ]; then keda_crds "$dir/crds.yaml"; fi
		{
			echo "binary=$n"
			echo "version=$version"
			echo "package=$(package_of "$n")"
			echo "built_with=${names# }"
			echo "wrapper=tests/k8s/$wrapper"
			echo "go=$(go env GOVERSION)"
			echo "ldflags=$ldflags"
			echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
			echo "build_seconds=$secs"
		} >"$dir/.stamp"
		echo "built    $n $version  $bin  (${secs}s)"
	done
	rm -rf "$tmpdir"
}

if [ $# -eq 0 ]; then
	# cheap ones first, so a partial run is already useful
	set -- etcd etcdctl kwok kwokctl helm crane kube-apiserver kubectl kube-controller-manager kube-scheduler \
		keda-operator keda-adapter
fi
for b in "$@"; do
	k8s_version_of "$b" >/dev/null || { echo "build.sh: unknown binary '$b' (known: $K8S_BINARIES)" >&2; exit 2; }
done

T0=$(date +%s)
for b in "$@"; do build_one "$b"; done

# KUBEBUILDER_ASSETS: etcd, kube-apiserver, kubectl side by side.
if [ -x "$(k8s_bin etcd)" ] && [ -x "$(k8s_bin kube-apiserver)" ] && [ -x "$(k8s_bin kubectl)" ]; then
	mkdir -p "$K8S_ASSETS"
	for b in etcd kube-apiserver kubectl; do ln -sfn "$(k8s_bin $b)" "$K8S_ASSETS/$b"; done
	echo "assets   $K8S_ASSETS"
fi
echo "done in $(($(date +%s) - T0))s; source tests/k8s/env.sh to use them"
