{{/* The chart's name, or nameOverride. */}}
{{- define "nodegate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, the prefix of every object's name: fullnameOverride, else
<release>-<chart> (just <release> when it already contains the chart's name). Kept to 40
characters so that "<fullname>-operator-leader-election" still fits in 63.
*/}}
{{- define "nodegate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nodegate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "nodegate.labels" -}}
helm.sh/chart: {{ include "nodegate.chart" . }}
app.kubernetes.io/part-of: nodegate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of a component ("operator" or "agent"): pass (list $ "operator"). */}}
{{- define "nodegate.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "nodegate.name" $ }}-{{ index . 1 }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Labels of a component's objects: pass (list $ "operator"). */}}
{{- define "nodegate.componentLabels" -}}
{{ include "nodegate.labels" (index . 0) }}
app.kubernetes.io/name: {{ include "nodegate.name" (index . 0) }}-{{ index . 1 }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "nodegate.operator.fullname" -}}
{{ include "nodegate.fullname" . }}-operator
{{- end }}

{{- define "nodegate.agent.fullname" -}}
{{ include "nodegate.fullname" . }}-agent
{{- end }}

{{- define "nodegate.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "nodegate.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "nodegate.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "nodegate.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image reference of a component: pass .Values.operator.image or .Values.agent.image and $ */}}
{{- define "nodegate.image" -}}
{{- $image := index . 0 -}}
{{- $ := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $.Chart.AppVersion $image.tag) }}
{{- end }}

{{/*
The restricted Pod Security profile, for the pod and for the container. The images run as
65532:65532 (numeric, so runAsNonRoot can verify it).
*/}}
{{- define "nodegate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "nodegate.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The agent's serving-certificate Secret, or "" for a self-signed certificate. */}}
{{- define "nodegate.agent.tlsSecretName" -}}
{{- $tls := .Values.agent.tls -}}
{{- if eq $tls.mode "secret" }}
{{- required "agent.tls.secretName is required when agent.tls.mode is secret" $tls.secretName }}
{{- else if eq $tls.mode "certManager" }}
{{- default (printf "%s-tls" (include "nodegate.agent.fullname" .)) $tls.secretName }}
{{- end }}
{{- end }}

{{/* The signer's CA Secret and bundle ConfigMap (agent.tls.mode signer). */}}
{{- define "nodegate.agent.signerCASecret" -}}
{{- default (printf "%s-serving-ca" (include "nodegate.agent.fullname" .)) .Values.agent.tls.signer.caSecretName }}
{{- end }}
{{- define "nodegate.agent.signerBundleConfigMap" -}}
{{- default (printf "%s-serving-ca" (include "nodegate.agent.fullname" .)) .Values.agent.tls.signer.bundleConfigMap }}
{{- end }}

{{/*
How a ServiceMonitor verifies the agents' serving certificate (its tlsConfig), given a dict of
the chart (`root`), a CA file in Prometheus' filesystem (`caFile`, wins when set), the name to
check (`serverName`) and the values path for messages (`what`). Without a file: the bundle the
operator's signer publishes (agent.tls.mode signer), or the `ca.crt` of the cert-manager
Secret (certManager). Never insecureSkipVerify: a self-signed or own-Secret certificate needs
a caFile.
*/}}
{{- define "nodegate.agent.monitorTLS" -}}
{{- $root := .root -}}
{{- $mode := $root.Values.agent.tls.mode -}}
{{- if .caFile }}
caFile: {{ .caFile }}
{{- else if eq $mode "signer" }}
ca:
  configMap:
    name: {{ include "nodegate.agent.signerBundleConfigMap" $root }}
    key: ca.crt
{{- else if eq $mode "certManager" }}
ca:
  secret:
    name: {{ include "nodegate.agent.tlsSecretName" $root }}
    key: ca.crt
{{- else }}
{{- fail (printf "%s.caFile is required with agent.tls.mode %s: Prometheus verifies the agent's serving certificate (with mode signer or certManager the chart uses their CA)" .what $mode) }}
{{- end }}
{{- with .serverName }}
serverName: {{ . }}
{{- end }}
{{- end }}

{{/* The ConfigMap (name and key) holding the kubelet's CA, or "" for the service account's. */}}
{{- define "nodegate.agent.upstreamCAConfigMap" -}}
{{- $ca := .Values.agent.upstream.ca -}}
{{- if $ca.bundle }}
{{- printf "%s-upstream-ca" (include "nodegate.agent.fullname" .) }}
{{- else if $ca.configMap.name }}
{{- $ca.configMap.name }}
{{- end }}
{{- end }}

{{- define "nodegate.agent.upstreamCAKey" -}}
{{- if .Values.agent.upstream.ca.bundle }}ca.crt{{ else }}{{ .Values.agent.upstream.ca.configMap.key }}{{ end }}
{{- end }}

{{/* The ConfigMap (name and key) holding the CA of callers' client certificates, or "". */}}
{{- define "nodegate.agent.clientCAConfigMap" -}}
{{- $ca := .Values.agent.clientCA -}}
{{- if $ca.bundle }}
{{- printf "%s-client-ca" (include "nodegate.agent.fullname" .) }}
{{- else if $ca.configMap.name }}
{{- $ca.configMap.name }}
{{- end }}
{{- end }}

{{- define "nodegate.agent.clientCAKey" -}}
{{- if .Values.agent.clientCA.bundle }}ca.crt{{ else }}{{ .Values.agent.clientCA.configMap.key }}{{ end }}
{{- end }}

{{/*
The kubelet subresources the agent's credential is granted (the agent's --kubelet-access; the
ClusterRole <fullname>-agent-kubelet grants the same).
*/}}
{{- define "nodegate.agent.kubeletAccess" -}}
{{- $names := list "healthz" "pods" "stats" "metrics" "configz" "statusz" "log" -}}
{{- if .Values.agent.kubeletAccess.proxy }}{{ $names = append $names "proxy" }}{{ end -}}
{{- if .Values.agent.kubeletAccess.checkpoint }}{{ $names = append $names "checkpoint" }}{{ end -}}
{{- join "," $names -}}
{{- end }}

{{/*
The agent's flags for the node's other components (agent.components; docs/components.md).
*/}}
{{- define "nodegate.agent.componentArgs" -}}
{{- $c := .Values.agent.components -}}
{{- if $c.enabled -}}
- --components={{ join "," $c.enabled }}
{{- range $upstream, $url := $c.upstreams }}
- --component-upstream={{ $upstream }}={{ $url }}
{{- end }}
{{- if $c.nodeUpstreams }}
- --component-node-upstreams-file=/etc/nodegate/component-node-upstreams/upstreams.yaml
{{- end }}
{{- range $upstream, $_ := $c.caBundles }}
- --component-ca-file={{ $upstream }}=/etc/nodegate/component-ca/{{ $upstream }}.crt
{{- end }}
{{- range $upstream := $c.insecureSkipTLSVerify }}
{{- if and (has (trimSuffix "-healthz" $upstream) $c.enabled) (not (hasKey $c.caBundles $upstream)) }}
- --component-insecure-skip-tls-verify={{ $upstream }}
{{- end }}
{{- end }}
{{- if include "nodegate.agent.componentToken" . }}
- --component-token-file=/var/run/secrets/nodegate/component-token/token
{{- end }}
{{- with $c.etcdClientCertificate.secretName }}
- --etcd-client-cert-file=/etc/nodegate/etcd-client/{{ $c.etcdClientCertificate.certKey }}
- --etcd-client-key-file=/etc/nodegate/etcd-client/{{ $c.etcdClientCertificate.keyKey }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"true" when the agent needs its token for a component (the controller manager or scheduler).
*/}}
{{- define "nodegate.agent.componentToken" -}}
{{- $c := .Values.agent.components -}}
{{- if or (has "kube-controller-manager" $c.enabled) (has "kube-scheduler" $c.enabled) }}true{{ end -}}
{{- end }}
