{{/*
Names and labels shared by every template of the chart.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "signal-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release-qualified name used for every object; kept to 63 characters because some fields
(label values, Service names) allow no more.
*/}}
{{- define "signal-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "signal-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pods; they must never change between upgrades. */}}
{{- define "signal-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "signal-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The standard Kubernetes and Helm labels on every object. */}}
{{- define "signal-operator.labels" -}}
helm.sh/chart: {{ include "signal-operator.chart" . }}
{{ include "signal-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: signal-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "signal-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "signal-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference; the tag defaults to the chart's appVersion. */}}
{{- define "signal-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The default worker image reference; the tag defaults to the chart's appVersion. */}}
{{- define "signal-operator.workerImage" -}}
{{- printf "%s:%s" .Values.workerImage.repository (default .Chart.AppVersion .Values.workerImage.tag) }}
{{- end }}

{{/*
RBAC rules for reconciling SignalPipelines, granted cluster-wide or per watched namespace.
Secrets: `get` only. The operator reads just the Secrets a pipeline names in auth.secretRef, to
connect to NATS and ClickHouse itself and create the stream, consumer and table; workers receive
their credentials as secretKeyRef environment variables and need no Secret access at all.
*/}}
{{- define "signal-operator.pipelineRules" -}}
- apiGroups: ["signals.dev"]
  resources: ["signalpipelines"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["signals.dev"]
  resources: ["signalpipelines/status", "signalpipelines/scale"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["signals.dev"]
  resources: ["signalpipelines/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["events.k8s.io", ""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- /* list and watch: the operator watches Secrets' metadata (names and resourceVersions, no
data) to know which exist and when they change; it reads a Secret's data (get) only when a pipeline
references it, once per version (it used to be get only, on every reconcile). */}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
{{- end }}
