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

{{/* The config-map key the plugin reads, "" for none. Inline maps are resolved here, at render
     time (config.default, then config.fallbackStrategies); an external ConfigMap cannot be
     inspected, so config.default or else "default" is used. */}}
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

{{- define "nvidia-device-plugin.configMapName" -}}
{{- if .Values.config.name -}}
{{- .Values.config.name -}}
{{- else -}}
{{- printf "%s-configs" (include "nvidia-device-plugin.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the plugin may run with a MIG strategy other than none: set in values, or
     possibly in a config file. The NVIDIA runtime then needs NVIDIA_MIG_MONITOR_DEVICES=all and
     the container CAP_SYS_ADMIN to watch MIG devices (as with the official chart). */}}
{{- define "nvidia-device-plugin.migMayBeOn" -}}
{{- if or (and .Values.migStrategy (ne .Values.migStrategy "none")) (include "nvidia-device-plugin.configKey" .) -}}
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

{{/* "true" when the plugin may share GPUs with MPS: only a config file can turn MPS on. An
     external ConfigMap cannot be inspected, so it counts; an inline file counts when it has a
     `mps:` key. The MPS control daemon DaemonSet, MPS_ROOT and the /mps and /dev/shm mounts
     follow this. */}}
{{- define "nvidia-device-plugin.mpsMayBeOn" -}}
{{- $key := include "nvidia-device-plugin.configKey" . -}}
{{- if and $key .Values.config.name -}}
true
{{- else if and $key .Values.config.map -}}
{{- $file := index .Values.config.map $key -}}
{{- $text := ternary $file (toYaml $file) (kindIs "string" $file) -}}
{{- if regexMatch "(^|[^A-Za-z0-9_])[\"']?mps[\"']?[ \t]*:" $text -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of the MPS control daemon's pods: a name of their own, so that neither DaemonSet's
     selector matches the other's pods. */}}
{{- define "nvidia-device-plugin.mpsSelectorLabels" -}}
app.kubernetes.io/name: {{ include "nvidia-device-plugin.name" . }}-mps-control-daemon
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The MPS control daemon's env: the plugin's config file, MIG strategy and discovery settings,
     so that both build the same resources from the same node. */}}
{{- define "nvidia-device-plugin.mpsDaemonEnv" -}}
{{- $configKey := include "nvidia-device-plugin.configKey" . -}}
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
{{- if $configKey }}
- name: CONFIG_FILE
  value: /available-configs/{{ $configKey }}
{{- end }}
{{- end -}}
