{{- define "lacuna.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lacuna.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "lacuna.operatorSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "lacuna.postgresSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: postgresql
{{- end -}}

{{- define "lacuna.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lacuna.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lacuna.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret and key holding the lineage database URL. */}}
{{- define "lacuna.databaseSecret" -}}
{{- if eq .Values.postgresql.mode "external" -}}
{{- required "postgresql.external.existingSecret is required when postgresql.mode is external" .Values.postgresql.external.existingSecret -}}
{{- else -}}
{{- printf "%s-postgresql" (include "lacuna.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "lacuna.databaseSecretKey" -}}
{{- if eq .Values.postgresql.mode "external" -}}{{ .Values.postgresql.external.secretKey }}{{- else -}}url{{- end -}}
{{- end -}}

{{/* Restricted pod-security settings shared by every container. */}}
{{- define "lacuna.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}
