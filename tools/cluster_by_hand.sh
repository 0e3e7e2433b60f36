#!/bin/bash
# A 3-node cluster by hand on one machine: etcd, three `cachemesh serve --cluster`, a model.
# Run from a checkout after `make venv`: tools/cluster_by_hand.sh (DEMO_DIR: where it works).
# Ports 23790/23800 (etcd), 18000-18002 and 18100-18102 (the nodes) must be free.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PATH=$ROOT/.venv/bin:$PATH
W=${DEMO_DIR:-/tmp/cachemesh-cluster-demo}
mkdir -p "$W" && cd "$W" && rm -rf data a b c origin req.json ./*.log
etcd --data-dir $W/data --listen-client-urls http://127.0.0.1:23790 \
     --advertise-client-urls http://127.0.0.1:23790 \
     --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
     --initial-cluster default=http://127.0.0.1:23800 > etcd.log 2>&1 &
echo $! > etcd.pid
sleep 2
export CACHEMESH_SERVE_SOURCE_ROOTS=$W/origin   # local paths the API may serve from
export CACHEMESH_CLUSTER_TOKEN=$(openssl rand -hex 32)
python -c "from cachemesh.demo import make_demo_model; from pathlib import Path; print(make_demo_model(Path('$W/origin')))" > model.path
for n in a b c; do
  port=$((18000 + $(printf '%d' "'$n") - 97)); gport=$((18100 + $(printf '%d' "'$n") - 97))
  CACHEMESH_HOME=$W/$n cachemesh serve --port $port --grpc-port $gport --memory 1GiB --workers 1 \
     --cluster etcd://127.0.0.1:23790 --node-name $n --advertise http://127.0.0.1:$port > $n.log 2>&1 &
  echo $! > $n.pid
done
for port in 18000 18001 18002; do
  for i in $(seq 1 60); do curl -sf http://127.0.0.1:$port/v2/health/ready >/dev/null && break; sleep 0.5; done
done
echo '$ CACHEMESH_URL=http://127.0.0.1:18000 cachemesh models deploy digits '"$(cat model.path)"
CACHEMESH_URL=http://127.0.0.1:18000 cachemesh models deploy digits "$(cat model.path)"
python - > req.json <<'PY'
import json
from sklearn import datasets
d = datasets.load_digits()
print(json.dumps({"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP64",
                              "data": (d.images[1000].reshape(-1) / 16.0).round(4).tolist()}]}))
PY
echo '$ curl -si http://127.0.0.1:18001/v2/models/digits/infer -d @req.json   # asked of b'
curl -si http://127.0.0.1:18001/v2/models/digits/infer -d @req.json | grep -iE "^HTTP|^cachemesh-|outputs" | cut -c1-200
echo '$ curl -si http://127.0.0.1:18002/v2/models/digits/infer -d @req.json   # asked of c'
curl -si http://127.0.0.1:18002/v2/models/digits/infer -d @req.json | grep -iE "^HTTP|^cachemesh-|outputs" | cut -c1-200
sleep 6
echo '$ CACHEMESH_URL=http://127.0.0.1:18002 cachemesh nodes ls'
CACHEMESH_URL=http://127.0.0.1:18002 cachemesh nodes ls
echo '$ CACHEMESH_URL=http://127.0.0.1:18002 cachemesh models ls'
CACHEMESH_URL=http://127.0.0.1:18002 cachemesh models ls
for n in a b c; do kill "$(cat $n.pid)"; done
sleep 3
kill "$(cat etcd.pid)"
rm -rf "$W"
