{{/* Names, labels and the values computed from several others. */}}

{{- define "cachemesh.name" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "cachemesh.labels" -}}
app.kubernetes.io/name: cachemesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cachemesh.selector" -}}
app.kubernetes.io/name: cachemesh
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cachemesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "cachemesh.secret" -}}
{{- .Values.tokens.existingSecret | default (printf "%s-tokens" (include "cachemesh.name" .)) -}}
{{- end -}}

{{- define "cachemesh.etcdName" -}}
{{- printf "%s-etcd" (include "cachemesh.name" .) -}}
{{- end -}}

{{/* etcd://HOST:PORT,... that the nodes join. */}}
{{- define "cachemesh.clusterURL" -}}
{{- if .Values.cluster.externalEtcd.endpoints -}}
etcd://{{ join "," .Values.cluster.externalEtcd.endpoints }}
{{- else -}}
{{- $name := include "cachemesh.etcdName" . -}}
{{- $hosts := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $hosts = append $hosts (printf "%s-%d.%s-peers.%s.svc:2379" $name $i $name $.Release.Namespace) -}}
{{- end -}}
etcd://{{ join "," $hosts }}
{{- end -}}
{{- end -}}

{{/* A token of the Secret: the one already there on upgrade, else a new random one. */}}
{{- define "cachemesh.token" -}}
{{- $secret := lookup "v1" "Secret" .root.Release.Namespace (include "cachemesh.secret" .root) -}}
{{- if and $secret (index $secret.data .key) -}}
{{- index $secret.data .key -}}
{{- else -}}
{{- randAlphaNum 48 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* {zone: a, rack: r3} -> "rack=r3,zone=a" (CACHEMESH_NODE_LABELS). */}}
{{- define "cachemesh.nodeLabels" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
