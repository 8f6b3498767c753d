{{/* The chart name, or nameOverride. */}}
{{- define "pagoda.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's resource name: fullnameOverride, else "<release>-<chart>" (or the release
name alone when it already contains the chart name), at most 63 characters. */}}
{{- define "pagoda.fullname" -}}
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

{{/* "<fullname>-<suffix>" within 63 characters: the full name is shortened, never the suffix.
Call with (list $ "suffix"). */}}
{{- define "pagoda.suffixedName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "pagoda.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{/* The Deployment's or StatefulSet's name. A StatefulSet's pods carry a controller-revision-hash
label of its name plus 11 characters, so its name is kept to 52. */}}
{{- define "pagoda.workloadName" -}}
{{- if eq .Values.workload.kind "StatefulSet" }}
{{- include "pagoda.fullname" . | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- include "pagoda.fullname" . }}
{{- end }}
{{- end }}

{{- define "pagoda.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the release's pods. They never change across upgrades: selectors are
immutable. */}}
{{- define "pagoda.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagoda.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pagoda.labels" -}}
helm.sh/chart: {{ include "pagoda.chart" . }}
{{ include "pagoda.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
{{- end }}

{{- define "pagoda.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pagoda.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: pinned by digest when one is given (the tag is then left out: the
digest alone decides what runs), else by tag. */}}
{{- define "pagoda.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Where the API key Secret is mounted, and the file the server reads. */}}
{{- define "pagoda.apiKeyDir" -}}/etc/pagoda/api-key{{- end }}

{{- define "pagoda.apiKeySecretName" -}}
{{- default (include "pagoda.suffixedName" (list . "api-key")) .Values.apiKey.existingSecret }}
{{- end }}

{{- define "pagoda.apiKeyEnabled" -}}
{{- if or .Values.apiKey.create .Values.apiKey.existingSecret }}true{{ end }}
{{- end }}

{{/* Name of the cache claim: the chart's own, or the existing one. */}}
{{- define "pagoda.cacheClaimName" -}}
{{- if eq .Values.cache.type "existingClaim" }}
{{- .Values.cache.existingClaim.name }}
{{- else }}
{{- include "pagoda.suffixedName" (list . "cache") }}
{{- end }}
{{- end }}

{{/* Whether other pods may read the cache while this one syncs: a ReadWriteMany claim that several
replicas share (a StatefulSet's own claims, a ReadWriteOnce claim and an emptyDir are this pod's
alone). */}}
{{- define "pagoda.cacheShared" -}}
{{- if and (eq .Values.cache.type "pvc") (eq .Values.workload.kind "Deployment") (has "ReadWriteMany" .Values.cache.pvc.accessModes) }}true
{{- else if and (eq .Values.cache.type "existingClaim") (eq .Values.cache.existingClaim.accessMode "ReadWriteMany") }}true
{{- end }}
{{- end }}

{{/* Where the synced model lives inside the cache: a folder per model URI (a Hub URI names its
revision), so a release switched to another model syncs beside the files running replicas have
mapped instead of over them. */}}
{{- define "pagoda.modelDir" -}}
{{- printf "%s/models/%s" (trimSuffix "/" .Values.cache.mountPath) (sha256sum .Values.model.uri | trunc 16) }}
{{- end }}

{{/* A Hugging Face Hub model (hf://org/name[@revision] or org/name): synced into the cache in
huggingface_hub's layout and served from it offline. */}}
{{- define "pagoda.hubModel" -}}
{{- if or (hasPrefix "hf://" .Values.model.uri) (regexMatch "^[^:/]+/[^/]+$" .Values.model.uri) }}true{{ end }}
{{- end }}

{{- define "pagoda.servedModelName" -}}
{{- default .Values.model.uri .Values.model.servedModelName }}
{{- end }}

{{- define "pagoda.autoscaling" -}}
{{- if or .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}true{{ end }}
{{- end }}

{{/* The most replicas the workload can have, for the shared-claim check. */}}
{{- define "pagoda.maxReplicas" -}}
{{- if .Values.autoscaling.hpa.enabled }}{{ .Values.autoscaling.hpa.maxReplicas }}
{{- else if .Values.autoscaling.keda.enabled }}{{ .Values.autoscaling.keda.maxReplicas }}
{{- else }}{{ .Values.workload.replicas }}{{ end }}
{{- end }}

{{/* Startup probe failures allowed: enough periods to cover model.expectedStartupSeconds. */}}
{{- define "pagoda.startupFailureThreshold" -}}
{{- $period := int .Values.server.startupProbe.periodSeconds }}
{{- add (div (add (int .Values.model.expectedStartupSeconds) (sub $period 1)) $period) 1 }}
{{- end }}

{{/* Seconds the startup probe allows in all. */}}
{{- define "pagoda.startupBudgetSeconds" -}}
{{- mul (include "pagoda.startupFailureThreshold" . | int) (int .Values.server.startupProbe.periodSeconds) }}
{{- end }}

{{/* Checks of combinations no schema can express; a failure stops the render with a message. */}}
{{- define "pagoda.validateValues" -}}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling: enable the HPA or KEDA, not both: two autoscalers would fight over the replica count" }}
{{- end }}
{{- if and (eq .Values.cache.type "existingClaim") (not .Values.cache.existingClaim.name) }}
{{- fail "cache.existingClaim.name is required when cache.type is existingClaim" }}
{{- end }}
{{- $rwo := false }}
{{- if eq .Values.cache.type "pvc" }}
{{- $rwo = or (has "ReadWriteOnce" .Values.cache.pvc.accessModes) (has "ReadWriteOncePod" .Values.cache.pvc.accessModes) }}
{{- $rwo = and $rwo (not (has "ReadWriteMany" .Values.cache.pvc.accessModes)) (eq .Values.workload.kind "Deployment") }}
{{- else if eq .Values.cache.type "existingClaim" }}
{{- $rwo = has .Values.cache.existingClaim.accessMode (list "ReadWriteOnce" "ReadWriteOncePod") }}
{{- end }}
{{- $max := include "pagoda.maxReplicas" . | int }}
{{- if and $rwo (gt $max 1) }}
{{- fail (printf "cache: a ReadWriteOnce claim cannot be shared by up to %d replicas; use workload.kind StatefulSet (a claim per replica), a ReadWriteMany storage class, or an emptyDir cache" $max) }}
{{- end }}
{{- $keda := .Values.autoscaling.keda }}
{{- if and $keda.enabled (eq (int $keda.minReplicas) 0) (not $keda.query) }}
{{- fail "autoscaling.keda.minReplicas 0 could never scale back up: the default trigger reads the waiting requests of the server's own pods, a metric that does not exist while no pod runs. Use 1 or more, or give autoscaling.keda.query a metric that exists without pods (a gateway's request rate, say)" }}
{{- end }}
{{- if and .Values.gpu.enabled (gt (int .Values.gpu.count) 1) }}
{{- fail "gpu.count: the server serves a model on one GPU until it has tensor parallelism (it refuses --tensor-parallel-size above 1, after the model is downloaded), so more GPUs per pod would never be used" }}
{{- end }}
{{- if and .Values.deploymentStrategy (ne .Values.workload.kind "Deployment") }}
{{- fail "deploymentStrategy applies to a Deployment; a StatefulSet replaces its pods one at a time" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "metrics: enable the ServiceMonitor or the PodMonitor, not both: Prometheus would scrape every pod twice" }}
{{- end }}
{{- end }}
