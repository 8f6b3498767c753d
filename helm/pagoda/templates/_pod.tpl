{{/* The pod template shared by the Deployment and the StatefulSet. */}}
{{- define "pagoda.podTemplate" -}}
metadata:
  labels:
    {{- include "pagoda.labels" . | nindent 4 }}
    {{- if .Values.serviceAccount.azureWorkloadIdentity }}
    azure.workload.identity/use: "true"
    {{- end }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "pagoda.serviceAccountName" . }}
  {{- /* Cloud identities (IRSA, workload identity) are injected by their webhooks; the pods
  themselves never call the Kubernetes API. */}}
  automountServiceAccountToken: false
  {{- with .Values.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- /* Room for the preStop wait and the drain after SIGTERM. */}}
  terminationGracePeriodSeconds: {{ add .Values.server.shutdownTimeoutSeconds .Values.server.preStopSleepSeconds 15 }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := .Values.tolerations }}
  {{- if and .Values.gpu.enabled .Values.gpu.defaultToleration }}
  {{- $tolerations = append $tolerations (dict "key" .Values.gpu.resourceName "operator" "Exists" "effect" "NoSchedule") }}
  {{- end }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- range .Values.topologySpreadConstraints }}
    {{- $c := deepCopy . }}
    {{- if not $c.labelSelector }}
    {{- $_ := set $c "labelSelector" (dict "matchLabels" (include "pagoda.selectorLabels" $ | fromYaml)) }}
    {{- end }}
    - {{- toYaml $c | nindent 6 }}
    {{- end }}
  {{- end }}
  {{- if .Values.model.uri }}
  initContainers:
    - name: model-sync
      image: {{ include "pagoda.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      {{- /* Idempotent: an intact cache is checked and nothing is downloaded; an interrupted
      one resumes; a second pod syncing a shared cache waits on the sync's lock. */}}
      args:
        - sync
        - {{ .Values.model.uri | quote }}
        - {{ include "pagoda.modelDir" . | quote }}
        - --progress
        - log
        - --sync-concurrency
        - {{ .Values.model.sync.concurrency | quote }}
        - --sync-part-size
        - {{ .Values.model.sync.partSize | quote }}
        {{- if not (include "pagoda.hubModel" .) }}
        {{- /* A store model syncs as versions: a model changed in the store goes to a new folder
        beside the one running replicas have mapped, `current` then names it, and versions no
        running server holds are removed (a Hub cache keeps revisions apart itself). */}}
        - --versioned
        {{- end }}
        {{- if not (include "pagoda.cacheShared" .) }}
        {{- /* The cache is this pod's alone: the folders of models it no longer serves go, so
        switching models does not fill the disk. */}}
        - --remove-other-models
        {{- else if not (include "pagoda.hubModel" .) }}
        {{- /* A shared cache: other models' versions go only when no running server holds them. */}}
        - --remove-unused-models
        {{- end }}
        {{- with .Values.model.sync.endpoint }}
        - --endpoint
        - {{ . | quote }}
        {{- end }}
        {{- if .Values.model.sync.allowHttp }}
        - --allow-http
        {{- end }}
        {{- range .Values.model.sync.include }}
        - --include
        - {{ . | quote }}
        {{- end }}
        {{- range .Values.model.sync.exclude }}
        - --exclude
        - {{ . | quote }}
        {{- end }}
      env:
        - name: PAGODA_LOG_FORMAT
          value: {{ .Values.server.logFormat | quote }}
        {{- if .Values.gpu.enabled }}
        {{- /* The sync requests no GPU; on nodes whose default runtime is NVIDIA's it would still
        be handed every GPU of the node without this. */}}
        - name: NVIDIA_VISIBLE_DEVICES
          value: void
        {{- end }}
        {{- with .Values.model.hfToken.existingSecret }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $.Values.model.hfToken.secretKey }}
        {{- end }}
      {{- with .Values.model.credentials.existingSecret }}
      envFrom:
        - secretRef:
            name: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml .Values.model.sync.resources | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: {{ .Values.cache.mountPath }}
        - name: tmp
          mountPath: /tmp
  {{- end }}
  containers:
    - name: pagoda
      image: {{ include "pagoda.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - serve
        - --host
        - "0.0.0.0"
        - --port
        - {{ .Values.server.port | quote }}
        {{- if include "pagoda.hubModel" . }}
        {{- /* The init container filled the Hub cache; the revision's snapshot is found there. */}}
        - --model
        - {{ .Values.model.uri | quote }}
        - --download-dir
        - {{ include "pagoda.modelDir" . | quote }}
        - --served-model-name
        - {{ include "pagoda.servedModelName" . | quote }}
        {{- else if .Values.model.uri }}
        - --model
        - {{ include "pagoda.modelDir" . | quote }}
        - --served-model-name
        - {{ include "pagoda.servedModelName" . | quote }}
        {{- else if .Values.model.servedModelName }}
        - --served-model-name
        - {{ .Values.model.servedModelName | quote }}
        {{- end }}
        - --dtype
        - {{ .Values.server.dtype | quote }}
        {{- if .Values.gpu.enabled }}
        - --device
        - cuda
        - --gpu-memory-utilization
        - {{ .Values.gpu.memoryUtilization | quote }}
        - --tensor-parallel-size
        - {{ .Values.gpu.count | quote }}
        {{- else }}
        - --device
        - cpu
        {{- end }}
        - --shutdown-timeout
        - {{ .Values.server.shutdownTimeoutSeconds | quote }}
        {{- range $flag, $value := dict "--max-model-len" .Values.server.maxModelLen "--max-num-seqs" .Values.server.maxNumSeqs "--max-num-batched-tokens" .Values.server.maxNumBatchedTokens "--max-queue" .Values.server.maxQueue }}
        {{- if not (kindIs "invalid" $value) }}
        - {{ $flag }}
        - {{ $value | quote }}
        {{- end }}
        {{- end }}
        {{- if include "pagoda.apiKeyEnabled" . }}
        {{- /* A file, not a variable: the key stays out of the process environment and of
        `kubectl describe`. */}}
        - --api-key-file
        - {{ printf "%s/api-key" (include "pagoda.apiKeyDir" .) | quote }}
        {{- end }}
        {{- range .Values.server.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        - name: PAGODA_LOG_FORMAT
          value: {{ .Values.server.logFormat | quote }}
        {{- if include "pagoda.hubModel" . }}
        - name: HF_HUB_OFFLINE
          value: "1"
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ .Values.server.port }}
          protocol: TCP
      {{- /* Startup waits for the model (sync and load) for up to model.expectedStartupSeconds;
      liveness and readiness start once it is ready. */}}
      startupProbe:
        httpGet:
          path: /ready
          port: http
        periodSeconds: {{ .Values.server.startupProbe.periodSeconds }}
        failureThreshold: {{ include "pagoda.startupFailureThreshold" . }}
        timeoutSeconds: 5
      livenessProbe:
        httpGet:
          path: /health
          port: http
        periodSeconds: {{ .Values.server.livenessProbe.periodSeconds }}
        failureThreshold: {{ .Values.server.livenessProbe.failureThreshold }}
        timeoutSeconds: {{ .Values.server.livenessProbe.timeoutSeconds }}
      readinessProbe:
        httpGet:
          path: /ready
          port: http
        periodSeconds: {{ .Values.server.readinessProbe.periodSeconds }}
        failureThreshold: {{ .Values.server.readinessProbe.failureThreshold }}
        timeoutSeconds: {{ .Values.server.readinessProbe.timeoutSeconds }}
      lifecycle:
        preStop:
          {{- /* Keep serving while the endpoints controller removes the pod, then SIGTERM
          starts the drain. */}}
          sleep:
            seconds: {{ .Values.server.preStopSleepSeconds }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- $resources := deepCopy .Values.server.resources }}
        {{- /* A node with room for the cache: the kubelet evicts a pod whose emptyDir outgrows its
        limit, and the scheduler counts this request against the node's disk. */}}
        {{- if and (eq .Values.cache.type "emptyDir") .Values.model.uri .Values.cache.emptyDir.sizeLimit }}
        {{- $requests := default dict $resources.requests }}
        {{- /* A limit of the user's own below the cache would make the request invalid: theirs stands. */}}
        {{- if not (or (hasKey $requests "ephemeral-storage") (hasKey (default dict $resources.limits) "ephemeral-storage")) }}
        {{- $_ := set $requests "ephemeral-storage" (.Values.cache.emptyDir.sizeLimit | toString) }}
        {{- $_ := set $resources "requests" $requests }}
        {{- end }}
        {{- end }}
        {{- if .Values.gpu.enabled }}
        {{- $limits := default dict $resources.limits }}
        {{- $_ := set $limits .Values.gpu.resourceName (.Values.gpu.count | toString) }}
        {{- $_ := set $resources "limits" $limits }}
        {{- $requests := default dict $resources.requests }}
        {{- $_ := set $requests .Values.gpu.resourceName (.Values.gpu.count | toString) }}
        {{- $_ := set $resources "requests" $requests }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: {{ .Values.cache.mountPath }}
          readOnly: true
        - name: shm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
        {{- if include "pagoda.apiKeyEnabled" . }}
        - name: api-key
          mountPath: {{ include "pagoda.apiKeyDir" . }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- with .Values.extraContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  volumes:
    {{- if not (and (eq .Values.workload.kind "StatefulSet") (eq .Values.cache.type "pvc")) }}
    - name: cache
      {{- if eq .Values.cache.type "emptyDir" }}
      {{- with .Values.cache.emptyDir.sizeLimit }}
      emptyDir:
        sizeLimit: {{ . }}
      {{- else }}
      emptyDir: {}
      {{- end }}
      {{- else }}
      persistentVolumeClaim:
        claimName: {{ include "pagoda.cacheClaimName" . }}
      {{- end }}
    {{- end }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.shm.sizeLimit }}
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
    {{- if include "pagoda.apiKeyEnabled" . }}
    - name: api-key
      secret:
        secretName: {{ include "pagoda.apiKeySecretName" . }}
        items:
          - key: {{ .Values.apiKey.secretKey }}
            path: api-key
        {{- /* 0440: readable by the pod's fsGroup, which owns the files, and nobody else. */}}
        defaultMode: 288
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
