# mrcp-lb: the two commands a fresh machine needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
PROXY := target/release/lb-proxy

.PHONY: help run demo test deps build fmt lint unit crds k8s chart-lint alerts e2e autoscale bench bench-operator soak fuzz audit audit-advisories cargo-deny

help:
	@echo "make run    build lb-proxy and run it on examples/standalone.yaml"
	@echo "make demo   run the proxy with two sipp MRCP-like servers and a sipp client"
	@echo "make test   install what the tests need, then lint and run every test (unit, sipp, operator, e2e)"
	@echo "make k8s    build the real Kubernetes binaries the tests use (cached outside the repo)"
	@echo "make alerts unit-test the chart's alerts (PrometheusRule) with promtool"
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
crds:
	$(CARGO) run -q -p lb-operator --bin crdgen > crds/mrcpserver.yaml
	@if [ -d charts/mrcp-lb/crds ]; then cp crds/mrcpserver.yaml charts/mrcp-lb/crds/mrcpserver.yaml; fi

# Real Kubernetes binaries (kube-apiserver, etcd, kwok, helm ...), built once and cached
# outside the repo (~/.cache/mrcp-lb). Uses both cores unless told otherwise.
k8s:
	K8S_BUILD_JOBS=$${K8S_BUILD_JOBS:-2} ./tests/k8s/build.sh

KEDA_VALUES := --set autoscaling.keda.enabled=true,autoscaling.keda.namespace=speech,autoscaling.keda.mrcpServer=unimrcp,autoscaling.keda.targetUtilization=0.6,autoscaling.keda.prometheus.serverAddress=http://prometheus.monitoring.svc:9090

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
	$(MAKE) fuzz FUZZ_SECONDS=45
	$(MAKE) e2e
	$(MAKE) autoscale
