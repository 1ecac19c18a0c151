# mrcp-lb: the two commands a fresh machine needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
PROXY := target/release/lb-proxy

.PHONY: help run demo test deps build fmt lint unit crds k8s chart-lint alerts e2e autoscale bench bench-operator soak fuzz audit audit-advisories cargo-deny image image-test

help:
	@echo "make run    build lb-proxy and run it on examples/standalone.yaml"
	@echo "make demo   run the proxy with two sipp MRCP-like servers and a sipp client"
	@echo "make test   install what the tests need, then lint and run every test (unit, sipp, operator, e2e)"
	@echo "make k8s    build the real Kubernetes binaries the tests use (cached outside the repo)"
	@echo "make alerts unit-test the chart's alerts (PrometheusRule) with promtool"
	@echo "make image  OCI images of lb-proxy and lb-operator (static, scratch, non-root) without Docker: target/image/"
	@echo "make image-test  build them, unpack each and run its entrypoint from the unpacked root"
	@echo "make e2e    helm install into a real control plane, scale a StatefulSet, check with Prometheus"
	@echo "make autoscale  KEDA + HPA scale the UniMRCP StatefulSet up under calls and down with a drain"
	@echo "make bench  lb-proxy and Kamailio side by side (writes BENCHMARKS.md; never fails on timing)"
	@echo "make bench-operator  lb-operator's memory on a kwok cluster of 5,000 pods (docs/operator-scope.md)"
	@echo "make audit  cargo deny: licences, duplicate versions (warnings), sources (crates.io only)"
	@echo "make soak   30 min of mixed calls through lb-proxy; checks nothing is left and RSS is flat (MINUTES=N)"
	@echo "make fuzz   run each fuzz target for FUZZ_SECONDS (default 60); fails on a crash (see RELIABILITY.md)"

deps:
	@./scripts/install-deps.sh

build:
	$(CARGO) build --release -p lb-proxy

run: build
	./$(PROXY) --config examples/standalone.yaml

demo: deps build
	./scripts/demo.sh ./$(PROXY)

fmt:
	$(CARGO) fmt --all

# The CRD YAML is generated from the Rust types; a test fails when the committed copy differs.
# The chart renders its copy (files/crds/) as a template, so that helm upgrade updates it.
crds:
	$(CARGO) run -q -p lb-operator --bin crdgen > crds/mrcpserver.yaml
	@if [ -d charts/mrcp-lb/files/crds ]; then cp crds/mrcpserver.yaml charts/mrcp-lb/files/crds/mrcpserver.yaml; fi

# Real Kubernetes binaries (kube-apiserver, etcd, kwok, helm ...), built once and cached
# outside the repo (~/.cache/mrcp-lb). Uses both cores unless told otherwise.
k8s:
	K8S_BUILD_JOBS=$${K8S_BUILD_JOBS:-2} ./tests/k8s/build.sh

KEDA_VALUES := --set autoscaling.keda.enabled=true,autoscaling.keda.namespace=speech,autoscaling.keda.mrcpServer=unimrcp,autoscaling.keda.targetUtilization=0.6,autoscaling.keda.prometheus.serverAddress=http://prometheus.monitoring.svc:9090

# Any valid sha256 digest, for the image.digest checks.
IMAGE_TEST_DIGEST := 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef

chart-lint: k8s
	source tests/k8s/env.sh && "$$HELM" lint charts/mrcp-lb \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb > /dev/null \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.kind=DaemonSet,proxy.hostNetwork=true,operator.watchNamespace=speech > /dev/null \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set operator.className=tenant-b,operator.podSelector=mrcp-lb.io/server \
	     | grep -c -- '^            - --class=tenant-b$$\|^            - "--pod-selector=mrcp-lb.io/server"$$' | grep -qx 2 \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb --set operator.className=Tenant_B > /dev/null 2>&1 \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.cluster.enabled=false,proxy.service.type=LoadBalancer,proxy.service.loadBalancerIP=203.0.113.7,proxy.service.sessionAffinity=None > /dev/null \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.tls.enabled=true,proxy.tls.secretName=sip-tls,proxy.advertise=sip.example.com:5060 > /dev/null \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.tls.enabled=true,proxy.tls.secretName=sip-tls > /dev/null \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.routeKey.existingSecret=my-route-key | grep -q 'secretName: my-route-key' \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.routeKey.create=false | grep -q 'recordRoute:' \
	  && "$$HELM" lint charts/mrcp-lb -f examples/two-pools-values.yaml > /dev/null \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb -f examples/two-pools-values.yaml | grep -q '^      resources: sdp$$' \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.config.routing.sdp.perSesion=x > /dev/null 2>&1 \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb | grep -q '^kind: PrometheusRule$$' \
	  && "$$HELM" lint charts/mrcp-lb --set prometheusRule.enabled=true > /dev/null \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set prometheusRule.enabled=true,prometheusRule.labels.release=prom,prometheusRule.runbookUrl=https://example.com/README.md,prometheusRule.alerts.utilizationHigh.threshold=0.9 \
	     | grep -c 'runbook_url: "https://example.com/README.md"$$\|^    release: prom$$\|^              > 0.9$$' | grep -qx 9 \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb --set prometheusRule.alerts.noDestinationUp.for=soon > /dev/null 2>&1 \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb | grep -q 'value: "$$(POD_IP):8081"' \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.kind=DaemonSet,proxy.hostNetwork=true,proxy.admin.listenAddress=0.0.0.0 > /dev/null 2>&1 \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.admin.listenAddress=fd00::1 | grep -q 'value: "\[fd00::1\]:8081"' \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb | grep -q '^kind: NetworkPolicy$$' \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set networkPolicy.enabled=true | grep -c '^kind: NetworkPolicy$$' | grep -qx 2 \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set networkPolicy.enabled=true | grep -q '^  ingress: \[\]$$' \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set metrics.serviceMonitor.enabled=true,proxy.admin.protectReads=true | grep -q 'type: Bearer' \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.admin.protectReads=true | grep -q 'protectReads: true' \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.admin.livenessTimeoutSeconds=0 > /dev/null 2>&1 \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.admin.tls.enabled=true > /dev/null 2>&1 \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb --set proxy.admin.tls.enabled=true,proxy.admin.tls.secretName=admin-tls \
	     | grep -c 'proxy-tls-server-name=mrcp-lb-proxy-admin.default.svc$$\|scheme: HTTPS$$\|certFile: /etc/lb-proxy/admin-tls/tls.crt$$' | grep -qx 4 \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb | grep -q '^kind: ScaledObject$$' \
	  && "$$HELM" lint charts/mrcp-lb $(KEDA_VALUES) > /dev/null \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb -n mrcp-system $(KEDA_VALUES) --set autoscaling.keda.behavior.scaleDown.stabilizationWindowSeconds=60 \
	     | grep -c '^  namespace: speech$$\|^    name: unimrcp$$\|^      metricType: Value$$\|^        threshold: "0.6"$$\|^          stabilizationWindowSeconds: 60$$\|^        query: "max(mrcp_lb_server_utilization{namespace=\\"speech\\",mrcpserver=\\"unimrcp\\",resource=\\"pstn\\"}) \* max(mrcp_lb_server_destinations{' | grep -qx 6 \
	  && "$$HELM" template mrcp-lb charts/mrcp-lb $(KEDA_VALUES) --set autoscaling.keda.prometheus.namespaceLabel=exported_namespace | grep -q 'exported_namespace=\\"speech\\"' \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb --set autoscaling.keda.enabled=true,autoscaling.keda.mrcpServer=unimrcp,autoscaling.keda.prometheus.serverAddress=http://p:9090 > /dev/null 2>&1 \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb $(KEDA_VALUES) --set autoscaling.keda.targetUtilization=1.5 > /dev/null 2>&1 \
	  && ! "$$HELM" template mrcp-lb charts/mrcp-lb $(KEDA_VALUES) --set autoscaling.keda.minReplicaCount=0 > /dev/null 2>&1
	@# Chart conventions (README, "Chart values"): global, images (registry/tag/digest), extra
	@# args/env, pod labels/annotations, priority, scheduling, probes, security contexts, the
	@# operator's PDB, the CRD as an upgradeable template, the SIP Service kept on uninstall if asked.
	source tests/k8s/env.sh && T() { "$$HELM" template mrcp-lb charts/mrcp-lb "$$@"; } \
	  && "$$HELM" lint charts/mrcp-lb --set global.imageRegistry=reg.example.com,global.other=x > /dev/null \
	  && T --set global.imageRegistry=reg.example.com | grep -c '^          image: "reg.example.com/mrcp-lb/lb-\(proxy\|operator\):0.1.0"$$' | grep -qx 2 \
	  && T --set global.imageRegistry=reg.example.com,proxy.image.registry=r.io,proxy.image.tag=9.9,proxy.image.digest=sha256:$(IMAGE_TEST_DIGEST),operator.image.tag=1.2.3 \
	     | grep -c '^          image: "r.io/mrcp-lb/lb-proxy@sha256:$(IMAGE_TEST_DIGEST)"$$\|^          image: "reg.example.com/mrcp-lb/lb-operator:1.2.3"$$' | grep -qx 2 \
	  && ! T --set proxy.image.digest=latest > /dev/null 2>&1 \
	  && T --set 'proxy.extraArgs={--log-level=lb_proxy=debug}' --set 'operator.extraArgs={--resync-seconds=5}' \
	     --set-json 'proxy.extraEnv=[{"name":"RUST_BACKTRACE","value":"1"}]' --set-json 'operator.extraEnv=[{"name":"TZ","value":"UTC"}]' \
	     | grep -c '^            - --log-level=lb_proxy=debug$$\|^            - --resync-seconds=5$$\|^            - name: RUST_BACKTRACE$$\|^            - name: TZ$$' | grep -qx 4 \
	  && T --set proxy.podLabels.team=voice,operator.podLabels.team=voice,proxy.podAnnotations.a=b,operator.podAnnotations.a=b,proxy.priorityClassName=sip-critical,operator.priorityClassName=ops \
	     | grep -c '^        team: voice$$\|^        a: b$$\|^      priorityClassName: \(sip-critical\|ops\)$$' | grep -qx 6 \
	  && T --set proxy.nodeSelector.disk=ssd,operator.nodeSelector.disk=ssd,proxy.tolerations[0].key=sip,operator.tolerations[0].key=sip,proxy.affinity.podAntiAffinity.x=y,operator.affinity.nodeAffinity.x=y \
	     | grep -c '^        disk: ssd$$\|^        - key: sip$$\|^        podAntiAffinity:$$\|^        nodeAffinity:$$' | grep -qx 6 \
	  && T | grep -A8 '^      topologySpreadConstraints:$$' | grep -c 'maxSkew: 1$$\|topologyKey: kubernetes.io/hostname$$\|whenUnsatisfiable: ScheduleAnyway$$\|app.kubernetes.io/component: proxy$$' | grep -qx 4 \
	  && T | grep -c '^      topologySpreadConstraints:$$' | grep -qx 1 \
	  && ! T --set proxy.kind=DaemonSet | grep -q 'topologySpreadConstraints:' \
	  && ! T --set-json 'proxy.topologySpreadConstraints=[]' | grep -q 'topologySpreadConstraints:' \
	  && T --set-json 'operator.topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"DoNotSchedule"}]' \
	     | grep -A4 '^      topologySpreadConstraints:$$' | grep -c 'app.kubernetes.io/component: \(proxy\|operator\)$$' | grep -qx 2 \
	  && T --set proxy.livenessProbe.failureThreshold=7,proxy.readinessProbe.initialDelaySeconds=4,operator.livenessProbe.timeoutSeconds=9 \
	     | grep -c '^            failureThreshold: 7$$\|^            initialDelaySeconds: 4$$\|^            timeoutSeconds: 9$$' | grep -qx 3 \
	  && T --set proxy.readinessProbe.enabled=false,operator.livenessProbe.enabled=false | grep -c '^          \(readiness\|liveness\)Probe:$$' | grep -qx 2 \
	  && ! T --set proxy.livenessProbe.path=/x > /dev/null 2>&1 \
	  && T | grep -c '^            readOnlyRootFilesystem: true$$\|^            runAsUser: 65532$$\|^            allowPrivilegeEscalation: false$$\|^              - ALL$$\|^        fsGroup: 65532$$' | grep -qx 9 \
	  && T | grep -c '^          type: RuntimeDefault$$\|^        runAsNonRoot: true$$\|^            runAsNonRoot: true$$' | grep -qx 6 \
	  && "$$HELM" lint charts/mrcp-lb -f examples/openshift-values.yaml > /dev/null \
	  && ! T -f examples/openshift-values.yaml | grep -q 'runAsUser\|runAsGroup\|fsGroup' \
	  && T -f examples/openshift-values.yaml | grep -c '^            readOnlyRootFilesystem: true$$' | grep -qx 2 \
	  && ! T --show-only templates/operator.yaml | grep -q '^kind: PodDisruptionBudget$$' \
	  && T --set operator.replicas=2 --show-only templates/operator.yaml | grep -A20 '^kind: PodDisruptionBudget$$' | grep -c '^  minAvailable: 1$$\|^      app.kubernetes.io/component: operator$$' | grep -qx 2 \
	  && ! T --set operator.replicas=2,operator.podDisruptionBudget.enabled=false --show-only templates/operator.yaml | grep -q '^kind: PodDisruptionBudget$$' \
	  && T --show-only templates/crds.yaml | grep -c '^kind: CustomResourceDefinition$$\|^    helm.sh/resource-policy: keep$$\|^    app.kubernetes.io/managed-by: Helm$$' | grep -qx 3 \
	  && ! T --set crds.install=false | grep -q '^kind: CustomResourceDefinition$$' \
	  && ! T --set crds.keep=false --show-only templates/crds.yaml | grep -q 'resource-policy' \
	  && T --set proxy.service.keepOnUninstall=true --show-only templates/proxy.yaml | grep -B8 '^  type: ClusterIP$$' | grep -q '^    helm.sh/resource-policy: keep$$' \
	  && ! T --show-only templates/proxy.yaml | grep -q 'resource-policy'

# The chart's alerts: tests/alerts/run.sh renders the PrometheusRule with helm, runs
# `promtool check rules` on its spec and `promtool test rules` on tests/alerts/*.test.yaml.
alerts: deps k8s
	./tests/alerts/run.sh

e2e: deps k8s
	./tests/e2e/run.sh

# The KEDA ScaledObject of the chart with the real KEDA, HPA controller and Prometheus:
# scale up under calls, scale down with a drain, no failed call (tests/e2e/README.md).
autoscale: deps k8s
	./tests/e2e/autoscale.sh

# OCI images of both binaries without a Docker daemon (README, "Images"): static glibc
# binaries (cargo --target, apart from the normal builds) on an empty base, non-root, OCI
# labels; crane is built from the Go module proxy and cached like the Kubernetes binaries.
# Output: target/image/<binary>/ (OCI layout) and <binary>.digest.
# IMAGE_PROFILE=dev (make test): link the binaries statically from cargo test's dev build
# instead of a full static release build (scripts/image.sh; never publish those).
image: deps
	IMAGE_PROFILE=$(or $(IMAGE_PROFILE),release) ./scripts/image.sh

# Unpacks each image (index.json -> manifest -> config + layers) and runs its entrypoint
# chrooted into the unpacked root: --version, --help, lb-proxy --check and a start with
# /healthz; checks User, Entrypoint, labels, the files, and that a rebuild gives the same digests.
image-test: image
	./tests/image/run.sh

bench:
	./bench/run.sh

# The operator's memory on a kwok cluster of 5,000 pods (50 MRCP servers); a few minutes.
bench-operator: k8s
	$(CARGO) build -p lb-operator
	./bench/operator-memory.sh

soak: deps build
	LB_PROXY=$(PROXY) ./tests/soak/run.sh $(or $(MINUTES),30)

# Bounded fuzzing of everything lb-proxy reads from the network (nightly Rust, cargo-fuzz;
# fuzz/run.sh installs what is missing). A crash fails the run and leaves its input in
# fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 60
fuzz:
	./fuzz/run.sh $(FUZZ_SECONDS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p lb-proxy --all-targets --features test-stall -- -D warnings
	$(MAKE) audit

# cargo-deny, pinned, installed from crates.io into ~/.cargo/bin when missing or another version.
CARGO_DENY_VERSION := 0.20.2
cargo-deny:
	@$(CARGO) deny --version 2>/dev/null | grep -qx 'cargo-deny $(CARGO_DENY_VERSION)' \
	  || $(CARGO) install cargo-deny --locked --version $(CARGO_DENY_VERSION)

# deny.toml: licence allow-list, duplicate versions as warnings, crates.io as the only source.
# Offline: works without GitHub.
audit: cargo-deny
	$(CARGO) deny check --hide-inclusion-graph licenses bans sources

# RustSec advisories: needs the advisory database from GitHub (github.com/rustsec/advisory-db),
# which this project's CI machine cannot reach (see RELIABILITY.md, Security). Run it where it can.
audit-advisories: cargo-deny
	$(CARGO) deny check --hide-inclusion-graph advisories

unit:
	$(CARGO) test --workspace --lib

test: deps k8s lint chart-lint alerts
	$(CARGO) test --workspace
	# The liveness watchdog against a core stalled on purpose: a test build (feature test-stall).
	$(CARGO) test -p lb-proxy --features test-stall --test watchdog
	$(MAKE) image-test IMAGE_PROFILE=dev
	$(MAKE) fuzz FUZZ_SECONDS=45
	$(MAKE) e2e
	$(MAKE) autoscale
