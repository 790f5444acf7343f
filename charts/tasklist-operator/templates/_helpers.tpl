{{/*
Chart name, truncated to 63 characters (the DNS label limit of some name fields).
*/}}
{{- define "tasklist-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: "<release>-<chart>", or just "<release>" when the release name
already contains the chart name. Truncated to 63 characters.
*/}}
{{- define "tasklist-operator.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "tasklist-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource of the chart.
*/}}
{{- define "tasklist-operator.labels" -}}
helm.sh/chart: {{ include "tasklist-operator.chart" . }}
{{ include "tasklist-operator.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: tasklist-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels (Deployment selector, Service, PodDisruptionBudget, ServiceMonitor).
Never change these: a Deployment's selector is immutable.
*/}}
{{- define "tasklist-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tasklist-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount the operator runs as.
*/}}
{{- define "tasklist-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tasklist-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository@digest when a digest is set, else repository:tag with the
tag defaulting to the chart's appVersion.
*/}}
{{- define "tasklist-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
"true" when leader election is on: explicitly enabled, or more than one replica.
Use as: eq (include "tasklist-operator.leaderElection" .) "true"
*/}}
{{- define "tasklist-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ else }}false{{ end }}
{{- end }}

{{/*
"true" when a PodDisruptionBudget is rendered: explicitly enabled, or more than one replica.
*/}}
{{- define "tasklist-operator.pdbEnabled" -}}
{{- if or .Values.podDisruptionBudget.enabled (gt (int .Values.replicaCount) 1) }}true{{ else }}false{{ end }}
{{- end }}

{{/*
Name of the leader-election Lease.
*/}}
{{- define "tasklist-operator.leaseName" -}}
{{- default (include "tasklist-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
RBAC rules the reconciler needs wherever it watches TasklistConnections. Shared by the
ClusterRole (cluster-wide mode) and the per-namespace Roles (namespaced mode).
- tasklistconnections: read and watch; status: read and patch (server-side apply / merge).
- secrets: read and watch the referenced credential Secrets and the derived Secrets; create
  and patch the derived Secrets. No delete: derived Secrets carry an ownerReference to their
  TasklistConnection, so the garbage collector deletes them.
- events (events.k8s.io): record Events on TasklistConnections.
*/}}
{{- define "tasklist-operator.rules" -}}
- apiGroups: ["tasklist.camunda.community"]
  resources: ["tasklistconnections"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["tasklist.camunda.community"]
  resources: ["tasklistconnections/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
