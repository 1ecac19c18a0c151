#!/usr/bin/env bash
# Prove the images of `make image` work (`make image-test`): for lb-proxy and lb-operator,
# read the OCI layout as a runtime would (index.json -> manifest -> config + layers), unpack
# the layers into an empty root and run the entrypoint from there, chrooted (as root, or in a
# user namespace with `unshare -r`) so that nothing from the host is used:
#   - the config: User 65532:65532 (numeric, non-root), Entrypoint the binary, linux/amd64,
#     the OCI labels (version = Cargo's, revision = the commit, source, licenses, created);
#   - the root holds the binary, /etc/passwd with the user, the CA bundle, and nothing else;
#   - `--version` prints the Cargo version, `--help` works;
#   - lb-proxy: `--check` accepts examples/standalone.yaml and rejects a broken copy; started
#     on it (bound to 127.0.13.2) it answers /healthz and /readyz, and stops on SIGTERM;
#   - lb-operator: without a cluster it fails at once with the kube client's error (it got
#     as far as reading its configuration);
#   - building the images again gives the same digests (reproducible), unless
#     IMAGE_TEST_NO_REBUILD=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
VERSION=$(cargo metadata --format-version 1 --no-deps | jq -r '.packages[] | select(.name == "lb-proxy") | .version')
OUT=$TARGET_DIR/image
WORK=$(mktemp -d /tmp/mrcp-lb-image-test.XXXXXX)
PROXY_PID=""
cleanup() {
	if [ -n "$PROXY_PID" ]; then kill "$PROXY_PID" 2>/dev/null || true; fi
	rm -rf "$WORK"
}
trap cleanup EXIT

pass() { echo "image-test: ok   $*"; }
fail() {
	echo "image-test: FAIL $*" >&2
	exit 1
}

# Run a command chrooted into $1: as root directly, else in a user namespace, else with sudo.
CHROOT=$(PATH=$PATH:/usr/sbin:/sbin command -v chroot) || fail "no chroot (coreutils)"
if [ "$(id -u)" = 0 ]; then
	IN_ROOT=("$CHROOT")
elif unshare -r true 2>/dev/null; then
	IN_ROOT=("$(command -v unshare)" -r "$CHROOT")
elif sudo -n true 2>/dev/null; then # e.g. GitHub's Ubuntu 24.04 runners (no unprivileged userns)
	IN_ROOT=(sudo -n "$CHROOT")
else
	fail "needs root, user namespaces (unshare -r) or sudo -n to chroot into the unpacked image"
fi
in_root() { "${IN_ROOT[@]}" "$@"; }

blob() { echo "$1/blobs/${2/://}"; } # LAYOUT DIGEST -> path

for b in lb-proxy lb-operator; do
	layout=$OUT/$b
	[ -f "$layout/index.json" ] || fail "$layout: no OCI layout (run make image)"
	jq -e '.imageLayoutVersion == "1.0.0"' "$layout/oci-layout" >/dev/null || fail "$b: oci-layout"
	mdesc=$(jq -c '.manifests[0]' "$layout/index.json")
	[ "$(jq -r .mediaType <<<"$mdesc")" = application/vnd.oci.image.manifest.v1+json ] ||
		fail "$b: index.json's manifest is not an OCI image manifest: $mdesc"
	manifest=$(blob "$layout" "$(jq -r .digest <<<"$mdesc")")
	[ "$(sha256sum "$manifest" | cut -d' ' -f1)" = "$(jq -r .digest <<<"$mdesc" | cut -d: -f2)" ] ||
		fail "$b: manifest digest mismatch"
	[ "sha256:$(sha256sum "$manifest" | cut -d' ' -f1)" = "$(cat "$OUT/$b.digest")" ] ||
		fail "$b: $b.digest is not the layout's manifest"
	config=$(blob "$layout" "$(jq -r .config.digest "$manifest")")
	[ "$(jq -r .config.mediaType "$manifest")" = application/vnd.oci.image.config.v1+json ] || fail "$b: config media type"

	# The config.
	jq -e '.os == "linux" and .architecture == "amd64"' "$config" >/dev/null || fail "$b: platform $(jq -c '[.os,.architecture]' "$config")"
	[ "$(jq -r .config.User "$config")" = 65532:65532 ] || fail "$b: User $(jq -r .config.User "$config")"
	[ "$(jq -c .config.Entrypoint "$config")" = "[\"/usr/local/bin/$b\"]" ] || fail "$b: Entrypoint $(jq -c .config.Entrypoint "$config")"
	label() { jq -r --arg k "org.opencontainers.image.$1" '.config.Labels[$k] // ""' "$config"; }
	[ "$(label version)" = "$VERSION" ] || fail "$b: label version '$(label version)'"
	rev=$(git rev-parse HEAD)
	[[ "$(label revision)" == "$rev" || "$(label revision)" == "$rev-dirty" ]] || fail "$b: label revision '$(label revision)' (HEAD $rev)"
	[ -n "$(label source)" ] || fail "$b: no source label"
	[ "$(label licenses)" = Apache-2.0 ] || fail "$b: label licenses '$(label licenses)'"
	[[ "$(label created)" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z$ ]] || fail "$b: label created '$(label created)'"
	profile=$(jq -r '.config.Labels["io.mrcp-lb.build-profile"] // ""' "$config")
	[[ "$profile" == release || "$profile" == dev ]] || fail "$b: label io.mrcp-lb.build-profile '$profile'"
	pass "$b: config: linux/amd64, User 65532:65532, Entrypoint /usr/local/bin/$b, labels version=$VERSION revision=$(label revision) created=$(label created), $profile build"

	# The layers, in order, into an empty root (checking each blob's digest).
	root=$WORK/$b
	mkdir -p "$root"
	n=0
	while read -r d; do
		f=$(blob "$layout" "$d")
		[ "sha256:$(sha256sum "$f" | cut -d' ' -f1)" = "$d" ] || fail "$b: layer $d digest mismatch"
		tar -xzf "$f" -C "$root" --numeric-owner
		n=$((n + 1))
	done < <(jq -r '.layers[].digest' "$manifest")
	files=$(cd "$root" && find . -type f | sort | tr '\n' ' ')
	[ "$files" = "./etc/group ./etc/passwd ./etc/ssl/certs/ca-certificates.crt ./usr/local/bin/$b " ] ||
		fail "$b: unexpected files in the image: $files"
	grep -q '^nonroot:x:65532:65532:' "$root/etc/passwd" || fail "$b: no 65532 in /etc/passwd"
	size=$(jq '[.layers[].size] | add' "$manifest")
	pass "$b: $n layer(s), $((size / 1024)) KiB compressed: $files"

	# The entrypoint, from the unpacked root only.
	entry=$(jq -r '.config.Entrypoint[0]' "$config")
	v=$(in_root "$root" "$entry" --version) || fail "$b --version"
	[ "$v" = "$b $VERSION" ] || fail "$b --version printed '$v'"
	in_root "$root" "$entry" --help | grep -q '^Usage: ' || fail "$b --help"
	pass "$b: --version ($v), --help"
done

# lb-proxy: a configuration check, then a real start.
root=$WORK/lb-proxy
mkdir -p "$root/test"
sed 's/127\.0\.0\.1:\(5060\|8081\)/127.0.13.2:\1/' examples/standalone.yaml >"$root/test/standalone.yaml"
grep -q '127.0.13.2:8081' "$root/test/standalone.yaml" || fail "could not rebind examples/standalone.yaml"
in_root "$root" /usr/local/bin/lb-proxy --check --config /test/standalone.yaml >"$WORK/check.log" 2>&1 ||
	fail "lb-proxy --check rejects examples/standalone.yaml: $(cat "$WORK/check.log")"
sed 's/^  listen: .*/  listen: not-an-address/' "$root/test/standalone.yaml" >"$root/test/broken.yaml"
if in_root "$root" /usr/local/bin/lb-proxy --check --config /test/broken.yaml >"$WORK/broken.log" 2>&1; then
	fail "lb-proxy --check accepted a broken admin.listen"
fi
pass "lb-proxy --check: accepts examples/standalone.yaml, rejects a broken one ($(head -c 120 "$WORK/broken.log" | tr '\n' ' '))"

# Not through the in_root function: $! must be the proxy itself (chroot and unshare exec it).
if curl -s --max-time 1 http://127.0.13.2:8081/healthz >/dev/null 2>&1; then fail "127.0.13.2:8081 is taken (a proxy left running?)"; fi
"${IN_ROOT[@]}" "$root" /usr/local/bin/lb-proxy --config /test/standalone.yaml --log-format json >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
ok=""
for _ in $(seq 100); do
	if curl -fsS --max-time 1 http://127.0.13.2:8081/healthz >/dev/null 2>&1; then ok=1; break; fi
	kill -0 "$PROXY_PID" 2>/dev/null || break
	sleep 0.1
done
[ -n "$ok" ] || fail "lb-proxy from the image did not answer /healthz: $(tail -5 "$WORK/proxy.log")"
if [ "${IN_ROOT[0]}" != sudo ]; then # sudo forks: $! is sudo, the proxy its child
	[ "$(readlink "/proc/$PROXY_PID/root")" = "$root" ] || fail "what answered /healthz is not the proxy chrooted into the image"
fi
ready=$(curl -sS --max-time 2 -o /dev/null -w '%{http_code}' http://127.0.13.2:8081/readyz)
[ "$ready" = 200 ] || fail "lb-proxy /readyz: $ready"
kill -TERM "$PROXY_PID"
for _ in $(seq 100); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$PROXY_PID" 2>/dev/null; then fail "lb-proxy did not stop on SIGTERM"; fi
wait "$PROXY_PID" || true
PROXY_PID=""
pass "lb-proxy from the image: /healthz and /readyz 200 on 127.0.13.2:8081, stopped on SIGTERM"

# lb-operator: no cluster (no KUBECONFIG, no in-cluster service account): a clean error.
root=$WORK/lb-operator
mkdir -p "$root/test"
echo image-test-token-0123456789 >"$root/test/token"
if env -i "${IN_ROOT[@]}" "$root" /usr/local/bin/lb-operator --proxy-selector app=x --listen 127.0.13.3:8080 \
	--token-file /test/token --log-format json >"$WORK/operator.log" 2>&1; then
	fail "lb-operator started without a cluster"
fi
grep -qi 'kube' "$WORK/operator.log" || fail "lb-operator without a cluster: not the kube client's error: $(tail -3 "$WORK/operator.log")"
pass "lb-operator without a cluster: exits with '$(tail -1 "$WORK/operator.log" | head -c 160)'"

# Reproducible: the same binaries give the same image digests.
if [ -z "${IMAGE_TEST_NO_REBUILD:-}" ]; then
	before="$(cat "$OUT/lb-proxy.digest") $(cat "$OUT/lb-operator.digest")"
	profile=$(jq -r '.config.Labels["io.mrcp-lb.build-profile"]' "$(blob "$OUT/lb-proxy" "$(jq -r .config.digest "$(blob "$OUT/lb-proxy" "$(jq -r '.manifests[0].digest' "$OUT/lb-proxy/index.json")")")")")
	IMAGE_PROFILE=$profile IMAGE_SKIP_CARGO=1 ./scripts/image.sh >"$WORK/rebuild.log" 2>&1 || fail "rebuild: $(tail -5 "$WORK/rebuild.log")"
	after="$(cat "$OUT/lb-proxy.digest") $(cat "$OUT/lb-operator.digest")"
	[ "$before" = "$after" ] || fail "not reproducible: $before, then $after"
	pass "reproducible: rebuilt with the same digests ($before)"
fi
echo "image-test: all passed"
