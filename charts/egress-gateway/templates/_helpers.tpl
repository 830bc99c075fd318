{{/* Base name of every object. */}}
{{- define "egress.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "egress.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "egress.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: egress-gateway
{{ include "egress.selectorLabels" . }}
{{- end -}}

{{- define "egress.selectorLabels" -}}
app.kubernetes.io/name: {{ include "egress.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* "repository:tag", the tag defaulting to the appVersion; call with (dict "ctx" $ "image" .Values.x.image). */}}
{{- define "egress.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "egress.gatewayServiceAccount" -}}{{ include "egress.fullname" . }}{{- end -}}
{{- define "egress.redirectorName" -}}{{ include "egress.fullname" . }}-node-redirector{{- end -}}
{{- define "egress.transparentService" -}}{{ include "egress.fullname" . }}-transparent{{- end -}}
{{- define "egress.relayKeySecret" -}}{{ .Values.redirector.relayKey.existingSecret | default (printf "%s-relay-key" (include "egress.fullname" .)) }}{{- end -}}
{{- define "egress.httpsSecret" -}}{{ .Values.gateway.https.secretName | default (printf "%s-https" (include "egress.fullname" .)) }}{{- end -}}
{{- define "egress.leaseName" -}}{{ include "egress.fullname" . }}-status{{- end -}}

{{/* "addr:port" for a listener. */}}
{{- define "egress.listen" -}}
{{- printf "%s:%d" .bind (int .port) | quote -}}
{{- end -}}

{{/* The gateway's configuration file (checked in CI by `egress-gateway validate`). */}}
{{- define "egress.gatewayConfig" -}}
{{- $g := .Values.gateway -}}
listen:
  http: {{ include "egress.listen" (dict "bind" $g.bindAddress "port" $g.ports.http) }}
  socks5: {{ include "egress.listen" (dict "bind" $g.bindAddress "port" $g.ports.socks5) }}
  admin: {{ include "egress.listen" (dict "bind" $g.bindAddress "port" $g.ports.admin) }}
  {{- if $g.https.enabled }}
  https: {{ include "egress.listen" (dict "bind" $g.bindAddress "port" $g.ports.https) }}
  {{- end }}
  {{- if .Values.redirector.enabled }}
  transparent: {{ include "egress.listen" (dict "bind" $g.bindAddress "port" $g.ports.transparent) }}
transparent:
  trustedRelays: {{- toYaml .Values.cluster.nodeCidrs | nindent 4 }}
  relayKeyFile: /etc/egress-gateway/relay-key/{{ .Values.redirector.relayKey.key }}
  relayMaxSkew: {{ $g.transparent.relayMaxSkew }}
  firstByteTimeout: {{ $g.transparent.firstByteTimeout }}
  {{- end }}
{{- if $g.https.enabled }}
{{- if not (or $g.https.secretName $g.https.certManager.enabled) }}
{{- fail "gateway.https: set secretName (a kubernetes.io/tls Secret) or certManager.enabled" }}
{{- end }}
{{- if and $g.https.certManager.enabled (not $g.https.certManager.issuerRef.name) }}
{{- fail "gateway.https.certManager.issuerRef.name: the issuer that signs the gateway's certificate" }}
{{- end }}
https:
  cert: /etc/egress-gateway/https/tls.crt
  key: /etc/egress-gateway/https/tls.key
  clientCert: {{ $g.https.clientCert }}
  {{- if ne $g.https.clientCert "None" }}
  clientCa: {{ if $g.https.clientCaSecret }}/etc/egress-gateway/https-client-ca/ca.crt{{ else }}/etc/egress-gateway/https/ca.crt{{ end }}
  {{- end }}
{{- end }}
defaultAction: {{ $g.defaultAction }}
resolver:
  timeout: {{ $g.resolver.timeout }}
  {{- with $g.resolver.nameservers }}
  nameservers: {{- toYaml . | nindent 4 }}
  {{- end }}
{{- with $g.guard.allowCidrs }}
guard:
  allowCidrs: {{- toYaml . | nindent 4 }}
{{- end }}
{{- with $g.egressAddresses }}
egressAddresses: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.clients }}
clients: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.policies }}
policies: {{- toYaml . | nindent 2 }}
{{- end }}
audit:
  sinks: {{- toYaml $g.audit.sinks | nindent 4 }}
  onFailure: {{ $g.audit.onFailure }}
  {{- if $g.audit.spool.enabled }}
  spool:
    dir: /var/lib/egress-gateway/spool
    maxBytes: {{ int64 $g.audit.spool.maxBytes }}
    segmentBytes: {{ int64 $g.audit.spool.segmentBytes }}
    fsync: {{ $g.audit.spool.fsync }}
  {{- end }}
  {{- with $g.audit.checkpoint }}
  {{- if .existingSecret }}
  checkpoint:
    keyFile: /etc/egress-gateway/checkpoint/{{ .key }}
    every: {{ int64 .every }}
    interval: {{ .interval }}
  {{- end }}
  {{- end }}
limits: {{- toYaml $g.limits | nindent 2 }}
shutdown:
  grace: {{ printf "%ds" (int $g.shutdownGraceSeconds) }}
kubernetes:
  enabled: true
  writeStatus: {{ $g.kubernetes.writeStatus }}
  leaseName: {{ include "egress.leaseName" . }}
  leaseDuration: {{ $g.kubernetes.leaseDuration }}
  {{- if $g.kubernetes.shareRateLimits }}
  rateLimitReplicas:
    namespace: {{ .Release.Namespace }}
    matchLabels: {{- include "egress.selectorLabels" (dict "ctx" . "component" "gateway") | nindent 6 }}
  {{- end }}
{{- with $g.identity }}
{{- if .tokens.issuer }}
identity:
  allowRemote: {{ .allowRemote }}
  tokens:
    issuer: {{ .tokens.issuer | quote }}
    audiences: {{- toYaml .tokens.audiences | nindent 6 }}
    {{- if .tokens.jwks }}
    # The issuer's JWKS, next to this file in the same ConfigMap.
    jwksFile: jwks.json
    {{- else }}
    # No jwksFile: the keys are fetched from the API server (/openid/v1/jwks).
    {{- end }}
    leeway: {{ .tokens.leeway }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The node-redirector's configuration file (checked in CI by `node-redirector validate`). */}}
{{- define "egress.redirectorConfig" -}}
{{- $r := .Values.redirector -}}
{{- $c := .Values.cluster -}}
relay:
  port: {{ $r.relayPort }}
  connectTimeout: {{ $r.connectTimeout }}
  probeInterval: {{ $r.probeInterval }}
  coalesce: {{ $r.coalesce }}
  {{- with $r.relayAddresses }}
  addresses: {{ toJson . }}
  {{- end }}
  keyFile: /etc/node-redirector/relay-key/{{ $r.relayKey.key }}
{{- if $r.adminPort }}
admin: {{ include "egress.listen" (dict "bind" $r.adminBindAddress "port" $r.adminPort) }}
{{- end }}
kubernetes:
  enabled: true
  gatewayService: {{ printf "%s/%s" .Release.Namespace (include "egress.transparentService" .) }}
  gatewayPortName: transparent
cni:
  enabled: {{ $r.cni.enabled }}
  socket: /var/run/egress-redirector/cni.sock
  logFile: /var/run/egress-redirector/cni.log
  failurePolicy: {{ $r.cni.failurePolicy }}
  {{- if $r.cni.enabled }}
  binDir: /host/cni/bin
  confDir: /host/cni/net.d
  {{- end }}
clusterDns: {{- toYaml $c.dnsServers | nindent 2 }}
dns:
  enabled: {{ $r.dns.enabled }}
  port: {{ $r.dns.port }}
  grace: {{ $r.dns.grace }}
  maxNamesPerPod: {{ int $r.dns.maxNamesPerPod }}
excludeCidrs: {{- concat $c.podCidrs $c.serviceCidrs $c.nodeCidrs $r.excludeCidrs | uniq | toYaml | nindent 2 }}
{{- end -}}

{{/* The restricted Pod Security profile's container settings for the gateway. */}}
{{- define "egress.restrictedContainer" -}}
runAsNonRoot: true
runAsUser: {{ .Values.gateway.runAsUser }}
runAsGroup: {{ .Values.gateway.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
