#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine: sipp (Debian package
# sip-tester), socat (sipp has no TLS: socat wraps its TCP in TLS) and the Rust components
# used by `make test`. Idempotent and quiet when all is there.
set -euo pipefail

need_apt=()
command -v sipp >/dev/null 2>&1 || need_apt+=(sip-tester)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)   # control-plane certificates
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
command -v tcpdump >/dev/null 2>&1 || need_apt+=(tcpdump)   # e2e: proves no packet left loopback
command -v socat >/dev/null 2>&1 || need_apt+=(socat)       # SIP over TLS tests: TLS in front of sipp
# promtool (checks the /metrics output, unit-tests the chart's alerts) comes with Debian's prometheus package.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# make image: Debian's CA bundle goes into the images (lb-proxy's system roots for TLS).
[ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)

if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  echo "installing ${need_apt[*]} from Debian packages"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
  echo "go is missing: the Kubernetes test binaries are built from the Go module proxy (install Go >= 1.26)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust (rustup) first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi
