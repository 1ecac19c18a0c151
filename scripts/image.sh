#!/usr/bin/env bash
# Build the OCI images of lb-proxy and lb-operator without a Docker daemon (`make image`).
#
#   scripts/image.sh            build both images
#   IMAGE_PROFILE=dev ...       from the dev profile (what `make test` uses; see below)
#   IMAGE_SKIP_CARGO=1 ...      reuse the static binaries already built
#
# Each image is one layer on an empty (scratch) base:
#   /usr/local/bin/<binary>            static (glibc, crt-static), stripped, root-owned 0755
#   /etc/passwd, /etc/group            the non-root user nonroot, 65532:65532
#   /etc/ssl/certs/ca-certificates.crt Debian's CA bundle (lb-proxy checks TLS servers against
#                                      the system roots unless tls.caFile is set)
# config: User 65532:65532, Entrypoint the binary, WorkingDir /, linux/amd64, OCI labels
# (version, revision, source, licenses, created, title, description).
#
# Output (not committed), under cargo's target directory (CARGO_TARGET_DIR or target/):
#   image/<binary>/                 an OCI image layout (index.json, oci-layout, blobs/sha256/)
#   image/<binary>.digest           the manifest digest
# Push one with: crane push target/image/lb-proxy REGISTRY/mrcp-lb/lb-proxy:TAG
#
# Tools: crane (go-containerregistry), built once from the Go module proxy and cached by
# tests/k8s/build.sh; it appends the layer and sets the config through a throw-away registry
# that it serves on 127.0.13.1 (loopback; stopped by PID at exit), then writes the OCI layout.
#
# Reproducible: the layer's files get the commit time (SOURCE_DATE_EPOCH, default: the time of
# the last commit), sorted names and numeric root ownership; the same binaries give the same
# digests (tests/image/run.sh checks this by building twice). The binaries themselves are the
# same for the same commit, toolchain, Cargo.lock and checkout path (paths end up in panic
# messages).
#
# IMAGE_PROFILE=release (default; `make image`, the images to publish): the static build
# compiles every crate again with crt-static under target/x86_64-unknown-linux-gnu/release
# (about 7 CPU-minutes). IMAGE_PROFILE=dev (`make test`): only the two binary crates are
# compiled again, with `cargo rustc ... -- -C target-feature=+crt-static`, and linked
# statically against the dev-profile libraries `cargo test` has built (glibc's libc link
# choice is made at the final link), then stripped: the same packaging, entrypoint and static
# linking, unoptimized code, in about a minute. Its images carry the label
# io.mrcp-lb.build-profile=dev; never publish them.
#
# Only linux/amd64: the only Rust target installed here is x86_64-unknown-linux-gnu and no
# other (aarch64, musl) can be downloaded, so there is no multi-arch index.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=tests/k8s/lib.sh
source tests/k8s/lib.sh

TRIPLE=x86_64-unknown-linux-gnu
BINARIES=(lb-proxy lb-operator)
IMAGE_UID=65532
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

say() { echo "image: $*"; }
die() {
	echo "image: $*" >&2
	exit 1
}

CRANE=$(k8s_bin crane)
[ -x "$CRANE" ] || tests/k8s/build.sh crane >/dev/null
[ -x "$CRANE" ] || die "no crane at $CRANE"
[ -f "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE (Debian package ca-certificates)"

TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
VERSION=$(cargo metadata --format-version 1 --no-deps | jq -r '.packages[] | select(.name == "lb-proxy") | .version')
# The workspace's repository (Cargo.toml [workspace.package]); a release sets IMAGE_SOURCE.
SOURCE=${IMAGE_SOURCE:-$(sed -n 's/^repository = "\(.*\)"$/\1/p' Cargo.toml | head -1)}
LICENSES=$(cargo metadata --format-version 1 --no-deps | jq -r '.packages[] | select(.name == "lb-proxy") | .license // empty')
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then REVISION+="-dirty"; fi
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
export SOURCE_DATE_EPOCH
CREATED=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
OUT=$TARGET_DIR/image
IMAGE_PROFILE=${IMAGE_PROFILE:-release}
case $IMAGE_PROFILE in
release) BIN_DIR=$TARGET_DIR/$TRIPLE/release ;;
dev) BIN_DIR=$TARGET_DIR/debug ;;
*) die "IMAGE_PROFILE must be release or dev, not '$IMAGE_PROFILE'" ;;
esac

# 1. Static binaries: glibc with crt-static (no musl target here). --target keeps them in
# target/x86_64-unknown-linux-gnu/, apart from the normal (dynamic) builds, whose cache stays
# valid; RUSTFLAGS then apply to the target's code only, not to build scripts. No debug info,
# symbols stripped: the release profile's `debug = 1` is for profiling on the host.
if [ -z "${IMAGE_SKIP_CARGO:-}" ]; then
	t0=$(date +%s)
	if [ "$IMAGE_PROFILE" = release ]; then
		say "cargo build --release --target $TRIPLE (static) -p lb-proxy -p lb-operator"
		RUSTFLAGS="-C target-feature=+crt-static" \
			CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
			cargo build --release --locked --target "$TRIPLE" -p lb-proxy -p lb-operator
	else
		for b in "${BINARIES[@]}"; do
			say "cargo rustc -p $b --bin $b -- -C target-feature=+crt-static (dev profile)"
			cargo rustc --locked -p "$b" --bin "$b" -- -C target-feature=+crt-static
		done
	fi
	say "static build ($IMAGE_PROFILE): $(($(date +%s) - t0)) s"
fi
for b in "${BINARIES[@]}"; do
	[ -x "$BIN_DIR/$b" ] || die "no $BIN_DIR/$b"
	if ! command -v file >/dev/null; then :
	elif ! file "$BIN_DIR/$b" | grep -q 'static-pie linked\|statically linked'; then die "$BIN_DIR/$b is not static"; fi
done

# 2. A throw-away registry on loopback for crane's append/mutate (they work on registries).
mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
REG_PID=""
cleanup() {
	if [ -n "$REG_PID" ]; then kill "$REG_PID" 2>/dev/null || true; fi
	rm -rf "$WORK"
}
trap cleanup EXIT
"$CRANE" registry serve --address 127.0.13.1:0 >"$WORK/registry.log" 2>&1 &
REG_PID=$!
PORT=""
for _ in $(seq 50); do
	PORT=$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$WORK/registry.log")
	[ -n "$PORT" ] && break
	sleep 0.1
done
[ -n "$PORT" ] || die "crane registry did not start: $(cat "$WORK/registry.log")"
REG=127.0.13.1:$PORT

description_of() {
	case $1 in
	lb-proxy) echo "SIP load balancer for UniMRCP (MRCPv2) speech servers: the data plane" ;;
	lb-operator) echo "Kubernetes operator feeding lb-proxy the UniMRCP servers of MrcpServer resources" ;;
	esac
}

for b in "${BINARIES[@]}"; do
	# 3. The layer: a root file system in a tar with fixed times, order and owners.
	rootfs=$WORK/$b-rootfs
	mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs"
	install -m 0755 "$BIN_DIR/$b" "$rootfs/usr/local/bin/$b"
	if [ "$IMAGE_PROFILE" = dev ]; then strip "$rootfs/usr/local/bin/$b"; fi
	install -m 0644 "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
	printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/sbin/nologin\n' \
		"$IMAGE_UID" "$IMAGE_UID" >"$rootfs/etc/passwd"
	printf 'root:x:0:\nnonroot:x:%s:\n' "$IMAGE_UID" >"$rootfs/etc/group"
	chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
	find "$rootfs" -type d -exec chmod 0755 {} +
	tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
		--format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
		-C "$rootfs" -cf "$WORK/$b.tar" usr etc

	# 4. Empty OCI base + the layer, then the config.
	"$CRANE" append --insecure --oci-empty-base -f "$WORK/$b.tar" -t "$REG/$b:build" >/dev/null 2>>"$WORK/crane.log" ||
		die "crane append: $(tail -5 "$WORK/crane.log")"
	"$CRANE" mutate --insecure "$REG/$b:build" -t "$REG/$b:$VERSION" \
		--set-platform linux/amd64 \
		--entrypoint "/usr/local/bin/$b" \
		--user "$IMAGE_UID:$IMAGE_UID" \
		--workdir / \
		--env PATH=/usr/local/bin \
		--label "org.opencontainers.image.title=$b" \
		--label "org.opencontainers.image.description=$(description_of "$b")" \
		--label "org.opencontainers.image.version=$VERSION" \
		--label "org.opencontainers.image.revision=$REVISION" \
		--label "org.opencontainers.image.source=$SOURCE" \
		--label "org.opencontainers.image.licenses=$LICENSES" \
		--label "org.opencontainers.image.created=$CREATED" \
		--label "io.mrcp-lb.build-profile=$IMAGE_PROFILE" >/dev/null 2>>"$WORK/crane.log" ||
		die "crane mutate: $(tail -5 "$WORK/crane.log")"

	# 5. Out as an OCI image layout.
	rm -rf "${OUT:?}/$b"
	"$CRANE" pull --insecure --format oci "$REG/$b:$VERSION" "$OUT/$b" 2>>"$WORK/crane.log" ||
		die "crane pull: $(tail -5 "$WORK/crane.log")"
	"$CRANE" digest --insecure "$REG/$b:$VERSION" >"$OUT/$b.digest"
	size=$(du -sb "$OUT/$b/blobs" | cut -f1)
	say "$b:$VERSION ($IMAGE_PROFILE) $(cat "$OUT/$b.digest")  $OUT/$b  ($((size / 1024)) KiB)"
done
