{{/* Names. Same rules as the official chart, so resources keep their names when switching charts. */}}
{{- define "nvidia-device-plugin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nvidia-device-plugin.fullname" -}}
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

{{- define "nvidia-device-plugin.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{- define "nvidia-device-plugin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "nvidia-device-plugin.labels" -}}
helm.sh/chart: {{ include "nvidia-device-plugin.chart" . }}
{{ include "nvidia-device-plugin.templateLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of the pods: the default selector labels plus any override. */}}
{{- define "nvidia-device-plugin.templateLabels" -}}
app.kubernetes.io/name: {{ include "nvidia-device-plugin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- with .Values.selectorLabelsOverride }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The DaemonSet selector: the override alone when given, else name + instance. */}}
{{- define "nvidia-device-plugin.selectorLabels" -}}
{{- if .Values.selectorLabelsOverride -}}
{{ toYaml .Values.selectorLabelsOverride }}
{{- else -}}
app.kubernetes.io/name: {{ include "nvidia-device-plugin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- end -}}

{{- define "nvidia-device-plugin.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "v%s" .Chart.AppVersion) .Values.image.tag) -}}
{{- end -}}

{{/* "true" when any value sets a plugin option (null means: leave the plugin's default). */}}
{{- define "nvidia-device-plugin.isSet" -}}
{{- if not (kindIs "invalid" .) }}true{{ end -}}
{{- end -}}

{{/* The device list strategy as the env var wants it: one string, items joined by commas. */}}
{{- define "nvidia-device-plugin.deviceListStrategy" -}}
{{- $s := .Values.deviceListStrategy -}}
{{- if kindIs "slice" $s }}{{ join "," $s }}{{ else }}{{ $s }}{{ end -}}
{{- end -}}

{{/* The config-map key GPU feature discovery's pod reads, "" for none (the plugin's and the MPS
     daemon's pods choose theirs per node through the config-manager). Inline maps are resolved
     here, at render time (config.default, then config.fallbackStrategies); an external ConfigMap
     cannot be inspected, so config.default or else "default" is used. */}}
{{- define "nvidia-device-plugin.configKey" -}}
{{- $c := .Values.config -}}
{{- if $c.default -}}
{{- $c.default -}}
{{- else if $c.name -}}
default
{{- else if $c.map -}}
{{- $key := "" -}}
{{- $done := false -}}
{{- range $c.fallbackStrategies -}}
{{- if not $done -}}
{{- if and (eq . "named") (hasKey $c.map "default") -}}
{{- $key = "default" -}}{{- $done = true -}}
{{- else if and (eq . "single") (eq (len $c.map) 1) -}}
{{- $key = keys $c.map | first -}}{{- $done = true -}}
{{- else if eq . "empty" -}}
{{- $done = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $done -}}
{{- fail (printf "config.map has %d entries and none was chosen: set config.default to one of %s" (len $c.map) (keys $c.map | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $key -}}
{{- end -}}
{{- end -}}

{{/* "true" when the pod runs the config-manager: a ConfigMap of named configs is in use
     (inline `config.map` or an existing `config.name`), as in the official chart. */}}
{{- define "nvidia-device-plugin.hasConfigMap" -}}
{{- if or .Values.config.name .Values.config.map -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when a node without the label gets a config from an inline map: config.default, or a
     fallback strategy that can resolve (the official chart's hasDefaultConfig). An external
     ConfigMap cannot be inspected at render time: the config-manager checks it at run time. */}}
{{- define "nvidia-device-plugin.hasDefaultConfig" -}}
{{- $c := .Values.config -}}
{{- if $c.default -}}
true
{{- else if $c.map -}}
{{- if or (and (has "named" $c.fallbackStrategies) (hasKey $c.map "default")) (and (has "single" $c.fallbackStrategies) (eq (len $c.map) 1)) (has "empty" $c.fallbackStrategies) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The config-manager's env, shared by the init container and the sidecar (as the official chart's). */}}
{{- define "nvidia-device-plugin.configManagerEnv" -}}
- name: KUBECONFIG
  value: ""
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: NODE_LABEL
  value: nvidia.com/device-plugin.config
- name: CONFIG_FILE_SRCDIR
  value: /available-configs
- name: CONFIG_FILE_DST
  value: /config/config.yaml
- name: DEFAULT_CONFIG
  value: {{ .Values.config.default | quote }}
- name: FALLBACK_STRATEGIES
  value: {{ join "," .Values.config.fallbackStrategies | quote }}
{{- end -}}

{{/* The config-manager's mounts: the named configs, the folder of the link, and the API token. */}}
{{- define "nvidia-device-plugin.configManagerMounts" -}}
- name: available-configs
  mountPath: /available-configs
  readOnly: true
- name: config
  mountPath: /config
- name: kube-api-access
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end -}}

{{/* The config-manager as an init container (ONESHOT): points the link before the main container
     starts. Takes (dict "root" $ "name" <container name>); the plugin's and the MPS control
     daemon's pods use it alike, as the official chart does. */}}
{{- define "nvidia-device-plugin.configManagerInit" -}}
{{- $root := .root -}}
# Points /config/config.yaml at the config the node label names, before the main container starts.
- name: {{ .name }}
  image: {{ include "nvidia-device-plugin.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["config-manager"]
  env:
    - name: ONESHOT
      value: "true"
    {{- include "nvidia-device-plugin.configManagerEnv" $root | nindent 4 }}
    - name: SEND_SIGNAL
      value: "false"
    - name: SIGNAL
      value: ""
    - name: PROCESS_TO_SIGNAL
      value: ""
  securityContext:
    {{- include "nvidia-device-plugin.configManagerSecurityContext" $root | nindent 4 }}
  volumeMounts:
    {{- include "nvidia-device-plugin.configManagerMounts" $root | nindent 4 }}
{{- end -}}

{{/* The config-manager as a sidecar: follows the node label, re-points the link and signals the
     process whose argv[0] is "process" (SIGHUP) when the config changes. Takes (dict "root" $
     "name" <container name> "process" <argv[0] to signal> "metrics" <serve /metrics>). */}}
{{- define "nvidia-device-plugin.configManagerSidecar" -}}
{{- $root := .root -}}
# Follows the node label; re-points the link and signals {{ .process }} when the config changes.
- name: {{ .name }}
  image: {{ include "nvidia-device-plugin.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["config-manager"]
  env:
    - name: ONESHOT
      value: "false"
    {{- include "nvidia-device-plugin.configManagerEnv" $root | nindent 4 }}
    - name: SEND_SIGNAL
      value: "true"
    - name: SIGNAL
      value: "1" # SIGHUP
    - name: PROCESS_TO_SIGNAL
      value: {{ .process | quote }}
    {{- if .metrics }}
    - name: NVDP_CONFIG_MANAGER_METRICS_ADDRESS
      value: "0.0.0.0:{{ $root.Values.metrics.configManagerPort }}"
    {{- end }}
  {{- if .metrics }}
  ports:
    - name: cm-metrics
      containerPort: {{ $root.Values.metrics.configManagerPort }}
      protocol: TCP
  {{- end }}
  securityContext:
    {{- include "nvidia-device-plugin.configManagerSecurityContext" $root | nindent 4 }}
  volumeMounts:
    {{- include "nvidia-device-plugin.configManagerMounts" $root | nindent 4 }}
{{- end -}}

{{/* What automountServiceAccountToken would mount, as a volume for the config-manager's
     containers only (the main containers never call the API). */}}
{{- define "nvidia-device-plugin.kubeApiAccessVolume" -}}
- name: kube-api-access
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end -}}

{{/* The config-manager needs no privilege: it reads the API, writes a link into an emptyDir and
     signals a process of the same user in the shared process namespace. */}}
{{- define "nvidia-device-plugin.configManagerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
readOnlyRootFilesystem: true
{{- end -}}

{{- define "nvidia-device-plugin.configMapName" -}}
{{- if .Values.config.name -}}
{{- .Values.config.name -}}
{{- else -}}
{{- printf "%s-configs" (include "nvidia-device-plugin.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the plugin may run with a MIG strategy other than none: set in values, or
     possibly in one of the named configs. The NVIDIA runtime then needs NVIDIA_MIG_MONITOR_DEVICES=all and
     the container CAP_SYS_ADMIN to watch MIG devices (as with the official chart). */}}
{{- define "nvidia-device-plugin.migMayBeOn" -}}
{{- if or (and .Values.migStrategy (ne .Values.migStrategy "none")) (include "nvidia-device-plugin.hasConfigMap" .) -}}
true
{{- end -}}
{{- end -}}

{{/* The container's securityContext, same rules as the official chart:
     1. an explicit securityContext wins;
     2. compatWithCPUManager: privileged (the plugin must pass device nodes);
     3. MIG possibly on, or volume-mounts in the list strategy: add CAP_SYS_ADMIN;
     4. otherwise nothing: no privilege escalation, every capability dropped.
     nvdp writes nothing outside the kubelet's folder, so the root filesystem is read-only in
     cases 2 and 4 (case 3 stays as upstream has it, for the runtime's MIG monitoring). */}}
{{- define "nvidia-device-plugin.securityContext" -}}
{{- $list := include "nvidia-device-plugin.deviceListStrategy" . -}}
{{- if .Values.securityContext -}}
{{ toYaml .Values.securityContext }}
{{- else if .Values.compatWithCPUManager -}}
privileged: true
readOnlyRootFilesystem: true
{{- else if or (include "nvidia-device-plugin.migMayBeOn" .) (has "volume-mounts" (splitList "," $list)) -}}
capabilities:
  add: ["SYS_ADMIN"]
{{- else -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
readOnlyRootFilesystem: true
{{- end -}}
{{- end -}}

{{/* GPU feature discovery's selector (and pod) labels: its own name, so the two DaemonSets never
     select each other's pods. */}}
{{- define "nvidia-device-plugin.gfdSelectorLabels" -}}
app.kubernetes.io/name: {{ (.Values.gfd | default dict).nameOverride | default "gpu-feature-discovery" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A GFD setting: gfd.<key>, else the top-level <key> (the official chart's template reads only
     the top-level one, so values files written for it keep their meaning); "" when neither is set. */}}
{{- define "nvidia-device-plugin.gfdSetting" -}}
{{- $values := index . 0 -}}
{{- $key := index . 1 -}}
{{- $gfd := $values.gfd | default dict -}}
{{- if not (kindIs "invalid" (index $gfd $key)) -}}
{{- index $gfd $key -}}
{{- else if not (kindIs "invalid" (index $values $key)) -}}
{{- index $values $key -}}
{{- end -}}
{{- end -}}

{{/* The official chart's GPU-node affinity: NFD saw an NVIDIA PCI device, or an NVIDIA CPU
     (Tegra), or the node is labelled nvidia.com/gpu.present=true by hand. */}}
{{- define "nvidia-device-plugin.gpuNodeAffinity" -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          - key: feature.node.kubernetes.io/pci-10de.present
            operator: In
            values: ["true"]
      - matchExpressions:
          - key: feature.node.kubernetes.io/cpu-model.vendor_id
            operator: In
            values: ["NVIDIA"]
      - matchExpressions:
          - key: nvidia.com/gpu.present
            operator: In
            values: ["true"]
{{- end -}}

{{/* "true" when the plugin may share GPUs with MPS: only a config file can turn MPS on, and with
     per-node configs any of the named configs may be chosen. An external ConfigMap cannot be
     inspected, so it counts; an inline map counts when one of its files has a `mps:` key. The MPS
     control daemon DaemonSet, MPS_ROOT and the /mps and /dev/shm mounts follow this. */}}
{{- define "nvidia-device-plugin.mpsMayBeOn" -}}
{{- $found := false -}}
{{- if .Values.config.name -}}
{{- $found = true -}}
{{- else -}}
{{- range $name, $file := .Values.config.map -}}
{{- $text := ternary $file (toYaml $file) (kindIs "string" $file) -}}
{{- if regexMatch "(^|[^A-Za-z0-9_])[\"']?mps[\"']?[ \t]*:" $text -}}
{{- $found = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $found -}}
true
{{- end -}}
{{- end -}}

{{/* Labels of the MPS control daemon's pods: a name of their own, so that neither DaemonSet's
     selector matches the other's pods. */}}
{{- define "nvidia-device-plugin.mpsSelectorLabels" -}}
app.kubernetes.io/name: {{ include "nvidia-device-plugin.name" . }}-mps-control-daemon
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The MPS control daemon's env: the plugin's config file (the config-manager's link), MIG strategy and discovery settings,
     so that both build the same resources from the same node. */}}
{{- define "nvidia-device-plugin.mpsDaemonEnv" -}}
{{- if not (kindIs "invalid" .Values.failOnInitError) }}
- name: FAIL_ON_INIT_ERROR
  value: {{ .Values.failOnInitError | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.migStrategy) }}
- name: MIG_STRATEGY
  value: {{ .Values.migStrategy | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.deviceDiscoveryStrategy) }}
- name: DEVICE_DISCOVERY_STRATEGY
  value: {{ .Values.deviceDiscoveryStrategy | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.logLevel) }}
- name: NVDP_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- end }}
{{- if include "nvidia-device-plugin.hasConfigMap" . }}
- name: CONFIG_FILE
  value: /config/config.yaml
{{- end }}
{{- end -}}

