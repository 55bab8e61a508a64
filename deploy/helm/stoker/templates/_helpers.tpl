{{/* The labels of every object (the same as deploy/base's; no helm-only labels). */}}
{{- define "stoker.labels" -}}
app.kubernetes.io/name: stoker
app.kubernetes.io/part-of: stoker
{{- end }}

{{/* "true" when leader election is on: as set, else when there is more than one replica. */}}
{{- define "stoker.leaderElect" -}}
{{- $on := gt (int .Values.replicaCount) 1 -}}
{{- if not (kindIs "invalid" .Values.leaderElection.enabled) -}}
{{- $on = .Values.leaderElection.enabled -}}
{{- end -}}
{{- if and (not $on) (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 needs leaderElection.enabled: two stokers without a Lease delete each other's pods" -}}
{{- end -}}
{{- if $on }}true{{ end -}}
{{- end }}

{{- define "stoker.pdb" -}}
{{- $on := gt (int .Values.replicaCount) 1 -}}
{{- if not (kindIs "invalid" .Values.podDisruptionBudget.enabled) -}}
{{- $on = .Values.podDisruptionBudget.enabled -}}
{{- end -}}
{{- if $on }}true{{ end -}}
{{- end }}

{{- define "stoker.serviceAccountSubject" -}}
- kind: ServiceAccount
  name: stoker
  namespace: {{ .Release.Namespace }}
{{- end }}
