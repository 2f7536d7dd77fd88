{{/* Labels on every object of the chart. */}}
{{- define "palisade.labels" -}}
app.kubernetes.io/name: palisade-control
app.kubernetes.io/part-of: palisade
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The pod selector: stable across upgrades, so it never includes the version. */}}
{{- define "palisade.selector" -}}
app.kubernetes.io/name: palisade-control
{{- end }}

{{- define "palisade.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The image injected into pods: proxyImage's fields, else the control plane's image. */}}
{{- define "palisade.proxyImage" -}}
{{ .Values.proxyImage.repository | default .Values.image.repository }}:{{ .Values.proxyImage.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
