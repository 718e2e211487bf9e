{{/* The chart's name, or nameOverride. */}}
{{- define "fednode.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's base name: fullnameOverride, else the release name when it already contains
the chart's name (release `fednode` gives fednode-coordinator), else RELEASE-fednode.
*/}}
{{- define "fednode.fullname" -}}
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

{{/* This release's objects: fullname-ROLE (fednode-coordinator, fednode-participant). */}}
{{- define "fednode.component" -}}
{{- printf "%s-%s" (include "fednode.fullname" .) .Values.role | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "fednode.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fednode.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: fednode
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
What selects this release's pods. The NetworkPolicy lets any pod with name=fednode and
component=participant in the namespace reach a coordinator, whatever its release.
*/}}
{{- define "fednode.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fednode.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .Values.role }}
{{- end }}

{{- define "fednode.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The identity Secret's name: the one given, or the chart's own. */}}
{{- define "fednode.identitySecret" -}}
{{- $role := index .Values .Values.role -}}
{{- if $role.identity.existingSecret }}
{{- $role.identity.existingSecret }}
{{- else if or $role.identity.key $role.identity.keys }}
{{- printf "%s-identity" (include "fednode.component" .) }}
{{- end }}
{{- end }}

{{/* Probes on the health port: /livez (alive) and /readyz (ready for work). */}}
{{- define "fednode.probes" -}}
startupProbe:
  httpGet:
    path: /livez
    port: health
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
livenessProbe:
  httpGet:
    path: /livez
    port: health
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
readinessProbe:
  httpGet:
    path: /readyz
    port: health
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
{{- end }}

{{/* The pod-level settings both StatefulSets share. */}}
{{- define "fednode.podSpec" -}}
automountServiceAccountToken: false
# no FEDNODE_COORDINATOR_PORT=tcp://… variables from the Services in the namespace
enableServiceLinks: false
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The volume claim for /data, from the role's persistence values. */}}
{{- define "fednode.volumeClaim" -}}
{{- $role := index .Values .Values.role -}}
- metadata:
    name: data
  spec:
    accessModes:
      {{- toYaml $role.persistence.accessModes | nindent 6 }}
    {{- with $role.persistence.storageClass }}
    storageClassName: {{ . }}
    {{- end }}
    resources:
      requests:
        storage: {{ $role.persistence.size }}
{{- end }}
