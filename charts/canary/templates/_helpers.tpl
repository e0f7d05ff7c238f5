{{- define "canary.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "canary.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "canary.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "canary.serviceAccount" -}}
{{- default (include "canary.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "canary.istioRules" -}}
# exactly what the Istio router uses (tests/test_helm_chart.py checks it)
- apiGroups: ["networking.istio.io"]
  resources: ["virtualservices"]
  verbs: ["get", "update"]
- apiGroups: ["networking.istio.io"]
  resources: ["destinationrules"]
  verbs: ["list"]
# a target's `workload:`: read both Deployments, copy the canary's pod template to the
# stable one, scale the canary (canary/workload.py)
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["patch"]
{{- end -}}

{{- define "canary.seconds" -}}
{{- /* a duration (30s, 15m, 2h, 1d) in seconds, for PromQL */ -}}
{{- $d := toString . -}}
{{- if hasSuffix "d" $d -}}{{ mul (trimSuffix "d" $d | int) 86400 }}
{{- else if hasSuffix "h" $d -}}{{ mul (trimSuffix "h" $d | int) 3600 }}
{{- else if hasSuffix "m" $d -}}{{ mul (trimSuffix "m" $d | int) 60 }}
{{- else -}}{{ trimSuffix "s" $d | int }}
{{- end -}}
{{- end -}}

{{- define "canary.gatewayRules" -}}
# exactly what the gateway router uses (tests/test_helm_chart.py checks it)
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "update"]
{{- end -}}
