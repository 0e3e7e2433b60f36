#!/bin/sh
# Calling the Model above through the mesh's Service (any node answers; it forwards to
# the node holding a copy). From inside the cluster; from outside, first:
#   kubectl port-forward svc/cachemesh 8008:8008
set -eu
URL=${CACHEMESH_URL:-http://cachemesh.cachemesh.svc:8008}
AUTH="Authorization: Bearer ${CACHEMESH_INFERENCE_TOKEN:?from the chart's Secret: inference-token}"

# OpenAI chat completions
curl -sf "$URL/v1/chat/completions" -H "$AUTH" -H 'Content-Type: application/json' \
  -d '{"model": "qwen-chat", "messages": [{"role": "user", "content": "Say hello."}],
       "max_tokens": 32}'

# KServe V2: the model's metadata and readiness
curl -sf "$URL/v2/models/qwen-chat" -H "$AUTH"
curl -sf -o /dev/null -w '%{http_code}\n' "$URL/v2/models/qwen-chat/ready" -H "$AUTH"
