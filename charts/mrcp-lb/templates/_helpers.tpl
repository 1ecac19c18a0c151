{{- define "mrcp-lb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mrcp-lb.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mrcp-lb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "mrcp-lb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "mrcp-lb.selector" -}}
app.kubernetes.io/name: {{ include "mrcp-lb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mrcp-lb.tokenSecret" -}}
{{- if .Values.adminToken.existingSecret -}}
{{- .Values.adminToken.existingSecret -}}
{{- else -}}
{{- printf "%s-admin-token" (include "mrcp-lb.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "mrcp-lb.routeKeySecret" -}}
{{- if .Values.proxy.routeKey.existingSecret -}}
{{- .Values.proxy.routeKey.existingSecret -}}
{{- else if .Values.proxy.routeKey.create -}}
{{- printf "%s-route-key" (include "mrcp-lb.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
A component's image reference, called with (list .Values.<component>.image $): registry (or
global.imageRegistry) / repository, then @digest when set (it wins over the tag), else :tag
(default: the chart's appVersion).
*/}}
{{- define "mrcp-lb.image" -}}
{{- $img := index . 0 -}}
{{- $root := index . 1 -}}
{{- $registry := $img.registry | default (dig "imageRegistry" "" ($root.Values.global | default dict)) -}}
{{- $ref := $img.repository -}}
{{- if $registry -}}
{{- $ref = printf "%s/%s" (trimSuffix "/" $registry) $img.repository -}}
{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $ref $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (toString ($img.tag | default $root.Chart.AppVersion)) -}}
{{- end -}}
{{- end -}}

{{/*
A probe's timing fields from values (without "enabled"), called with the probe's values.
*/}}
{{- define "mrcp-lb.probeTimings" -}}
{{- with omit . "enabled" }}
{{- toYaml . }}
{{- end }}
{{- end -}}

{{/*
topologySpreadConstraints with the component's pod labels as labelSelector where none is
given, called with (list constraints $ component).
*/}}
{{- define "mrcp-lb.topologySpread" -}}
{{- $root := index . 1 -}}
{{- $selector := include "mrcp-lb.selector" $root | fromYaml -}}
{{- $_ := set $selector "app.kubernetes.io/component" (index . 2) -}}
{{- $out := list -}}
{{- range index . 0 -}}
{{- $c := deepCopy . -}}
{{- if not (hasKey $c "labelSelector") -}}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $selector) -}}
{{- end -}}
{{- $out = append $out $c -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
host:port the proxies write into Via and Record-Route (values.yaml, proxy.advertise): the
value when set; for a Deployment the SIP Service, which every replica answers (its
loadBalancerIP when set, else its cluster DNS name); for a DaemonSet the pod's own IP.
*/}}
{{- define "mrcp-lb.advertise" -}}
{{- $p := .Values.proxy -}}
{{- if $p.advertise -}}
{{- $p.advertise -}}
{{- else if eq $p.kind "Deployment" -}}
{{- if $p.service.loadBalancerIP -}}
{{- if contains ":" $p.service.loadBalancerIP -}}
{{- printf "[%s]:%v" $p.service.loadBalancerIP $p.sipPort -}}
{{- else -}}
{{- printf "%s:%v" $p.service.loadBalancerIP $p.sipPort -}}
{{- end -}}
{{- else -}}
{{- printf "%s-sip.%s.svc.%s:%v" (include "mrcp-lb.fullname" .) .Release.Namespace .Values.clusterDomain $p.sipPort -}}
{{- end -}}
{{- else -}}
{{- printf "$(POD_IP):%v" $p.sipPort -}}
{{- end -}}
{{- end -}}

{{/*
An alert's runbook annotations: where README.md describes it, and runbook_url when
prometheusRule.runbookUrl is set. Called with (list runbookUrl alertName).
*/}}
{{- define "mrcp-lb.alertRunbook" -}}
runbook: {{ printf "mrcp-lb README.md, Operations, Alerts: %s" (index . 1) | quote }}
{{- with index . 0 }}
runbook_url: {{ . | quote }}
{{- end }}
{{- end -}}

{{/*
The proxies' admin listen address: proxy.admin.listenAddress, or the pod IP (the container's
POD_IP, expanded by the kubelet), with the admin port. Every interface (0.0.0.0, ::) is refused
with hostNetwork: the admin API would listen on every address of the node.
*/}}
{{- define "mrcp-lb.adminListen" -}}
{{- $p := .Values.proxy -}}
{{- $a := $p.admin.listenAddress -}}
{{- if and $p.hostNetwork (has $a (list "0.0.0.0" "::" "[::]")) -}}
{{- fail (printf "proxy.admin.listenAddress %q with proxy.hostNetwork: the admin API would listen on every interface of the node; leave it empty (the pod IP, i.e. the node's address) or give one address" $a) -}}
{{- end -}}
{{- if $a -}}
{{- if contains ":" $a -}}[{{ trimAll "[]" $a }}]:{{ $p.adminPort }}{{- else -}}{{ $a }}:{{ $p.adminPort }}{{- end -}}
{{- else -}}
$(POD_IP):{{ $p.adminPort }}
{{- end -}}
{{- end }}

{{/*
The name the proxies' admin certificate must carry (proxy.admin.tls.serverName, or the admin
Service's DNS name), and the admin TLS Secret (required when admin TLS is on).
*/}}
{{- define "mrcp-lb.adminTlsServerName" -}}
{{- default (printf "%s-proxy-admin.%s.svc" (include "mrcp-lb.fullname" .) .Release.Namespace) .Values.proxy.admin.tls.serverName -}}
{{- end }}
{{- define "mrcp-lb.adminTlsSecret" -}}
{{- required "proxy.admin.tls.secretName: the kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) of the admin API" .Values.proxy.admin.tls.secretName -}}
{{- end }}
