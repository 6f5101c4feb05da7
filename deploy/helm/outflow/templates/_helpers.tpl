{{- define "outflow.labels" -}}
app.kubernetes.io/part-of: outflow
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "outflow.agentName" -}}{{ .Release.Name }}-agent{{- end }}
{{- define "outflow.collectorName" -}}{{ .Release.Name }}-collector{{- end }}

{{- define "outflow.agentSelector" -}}
app.kubernetes.io/name: outflow-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outflow.collectorSelector" -}}
app.kubernetes.io/name: outflow-collector
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outflow.collectorUrl" -}}
{{- if .Values.agent.collectorUrl -}}
{{ .Values.agent.collectorUrl }}
{{- else -}}
{{ ternary "https" "http" .Values.secrets.tls.enabled }}://{{ include "outflow.collectorName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.collector.grpcPort }}
{{- end -}}
{{- end }}

{{- define "outflow.image" -}}
{{ .image.repository }}:{{ .image.tag | default .chart.AppVersion }}
{{- end }}
