#!/usr/bin/env bash
# Unit tests of the chart's alerts: renders charts/mrcp-lb with prometheusRule.enabled=true
# (default values otherwise) with the helm that tests/k8s/build.sh builds, takes the
# PrometheusRule's spec as a plain Prometheus rules file, and runs `promtool check rules` on it
# and `promtool test rules` on every tests/alerts/*.test.yaml. The rules tested are the ones
# the chart ships: nothing is copied by hand.
#
#   tests/alerts/run.sh            # make alerts
#   KEEP=1 tests/alerts/run.sh     # keep the rendered rules (path printed)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../k8s/env.sh
source "$root/tests/k8s/env.sh"
command -v promtool >/dev/null || { echo "promtool is missing (make deps: Debian package prometheus)" >&2; exit 1; }
[ -x "$HELM" ] || { echo "helm is missing: $HELM (make k8s)" >&2; exit 1; }

work=$(mktemp -d)
if [ -n "${KEEP:-}" ]; then echo "rendered rules kept in $work"; else trap 'rm -rf "$work"' EXIT; fi

"$HELM" template mrcp-lb "$root/charts/mrcp-lb" --set prometheusRule.enabled=true \
	--show-only templates/prometheusrule.yaml >"$work/prometheusrule.yaml"
grep -q '^kind: PrometheusRule$' "$work/prometheusrule.yaml" || { echo "no PrometheusRule rendered" >&2; exit 1; }

# Everything after the top-level `spec:` (the template keeps it last), two spaces less indented.
awk 'on { if ($0 != "" && substr($0, 1, 2) != "  ") { bad = 1; exit } sub(/^  /, ""); print }
     /^spec:$/ { on = 1 }
     END { exit bad || !on }' "$work/prometheusrule.yaml" >"$work/mrcp-lb.rules.yaml" \
	|| { echo "could not take spec out of the rendered PrometheusRule (spec must be its last key)" >&2; exit 1; }
head -1 "$work/mrcp-lb.rules.yaml" | grep -q '^groups:$' || { echo "the rendered spec does not start with groups:" >&2; exit 1; }

promtool check rules "$work/mrcp-lb.rules.yaml"

# Every alert the chart ships has a test file that names it.
alerts=$(sed -n 's/^ *- alert: *//p' "$work/mrcp-lb.rules.yaml")
for a in $alerts; do
	grep -lq "alertname: $a\$" "$here"/*.test.yaml || { echo "alert $a has no test in tests/alerts" >&2; exit 1; }
done

# promtool resolves rule_files next to each test file.
cp "$here"/*.test.yaml "$work/"
(cd "$work" && promtool test rules ./*.test.yaml)
echo "alerts: $(wc -w <<<"$alerts") alerts checked and unit-tested"
