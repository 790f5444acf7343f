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
{{- with .Values.global.commonLabels }}
{{ toYaml . }}
{{- end }}
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
"true" when leader election is on: explicitly enabled, more than one replica, or more than
one shard (each shard elects its leader on its own Lease).
Use as: eq (include "tasklist-operator.leaderElection" .) "true"
*/}}
{{- define "tasklist-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) (gt (int .Values.sharding.shards) 1) }}true{{ else }}false{{ end }}
{{- end }}

{{/*
How many Deployments share the connections (sharding.shards, at least 1).
*/}}
{{- define "tasklist-operator.shards" -}}
{{- max 1 (int .Values.sharding.shards) }}
{{- end }}

{{/*
The name of shard `.index`'s Deployment and PodDisruptionBudget: the full name, with
`-shard-<index>` when there is more than one shard. Call with (dict "context" $ "index" $index).
*/}}
{{- define "tasklist-operator.shardName" -}}
{{- $fullname := include "tasklist-operator.fullname" .context }}
{{- if gt (int (include "tasklist-operator.shards" .context)) 1 }}
{{- printf "%s-shard-%d" $fullname (int .index) }}
{{- else }}
{{- $fullname }}
{{- end }}
{{- end }}

{{/*
The label that sets one shard's pods apart (the Deployment's selector), none without
sharding. Call with (dict "context" $ "index" $index).
*/}}
{{- define "tasklist-operator.shardLabels" -}}
{{- if gt (int (include "tasklist-operator.shards" .context)) 1 }}
tasklist.camunda.community/shard: {{ .index | toString | quote }}
{{- end }}
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
Name of shard `.index`'s Lease: the Lease name, with `-shard-<index>-of-<shards>` when there
is more than one shard (as the operator names it). Call with (dict "context" $ "index" $index).
*/}}
{{- define "tasklist-operator.shardLeaseName" -}}
{{- $shards := int (include "tasklist-operator.shards" .context) }}
{{- if gt $shards 1 }}
{{- printf "%s-shard-%d-of-%d" (include "tasklist-operator.leaseName" .context) (int .index) $shards }}
{{- else }}
{{- include "tasklist-operator.leaseName" .context }}
{{- end }}
{{- end }}

{{/*
RBAC rules the reconciler needs wherever it watches TasklistConnections. Shared by the
ClusterRole (cluster-wide mode) and the per-namespace Roles (namespaced mode).
- tasklistconnections: read and watch; status: read and patch (server-side apply / merge).
- secrets: read and watch the referenced credential Secrets and the derived Secrets; create
  and patch the derived Secrets. No delete: derived Secrets carry an ownerReference to their
  TasklistConnection, so the garbage collector deletes them.
- events (events.k8s.io): record Events on TasklistConnections.
- pods, only with nudge.enabled: watch the labelled Pods and patch one annotation on them
  (admission-nudge.yaml limits the patch to that annotation).
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
{{- if .Values.rbac.serviceAccountTokens }}
# clientAuthentication ServiceAccountToken: a token of the ServiceAccount a connection names
# (the admission policy checks that its author may request one too).
- apiGroups: [""]
  resources: ["serviceaccounts/token"]
  verbs: ["create"]
{{- end }}
{{- if .Values.nudge.enabled }}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}

{{/*
A duration written like 10s, 1m30s or 500ms, in whole seconds (rounded up).
*/}}
{{- define "tasklist-operator.seconds" -}}
{{- $milliseconds := 0 }}
{{- range regexFindAll "[0-9]+(ms|h|m|s)" . -1 }}
{{- $amount := int (regexFind "^[0-9]+" .) }}
{{- $unit := trimPrefix (toString $amount) . }}
{{- $milliseconds = add $milliseconds (mul $amount (get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit)) }}
{{- end }}
{{- div (add $milliseconds 999) 1000 }}
{{- end }}

{{/*
Seconds a stopping pod gets: the value, or 2 × requestTimeout + 10 s, so that a token request
in flight (and the Secret write after it) can finish.
*/}}
{{- define "tasklist-operator.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (mul 2 (include "tasklist-operator.seconds" .Values.requestTimeout)) 10 }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
The image pull Secrets: global ones first, then the chart's, without duplicates.
*/}}
{{- define "tasklist-operator.imagePullSecrets" -}}
{{- $secrets := concat (default (list) .Values.global.imagePullSecrets) (default (list) .Values.imagePullSecrets) | uniq }}
{{- with $secrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Namespace of an optional monitoring object: its own value or the release namespace.
*/}}
{{- define "tasklist-operator.namespaceOr" -}}
{{- default .context.Release.Namespace .namespace }}
{{- end }}
