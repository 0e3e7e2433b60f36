"""The Helm chart with the real helm binary: lint, render (default values, an external etcd,
a PodMonitor), and every rendered object validated against the schemas of Kubernetes 1.37
(kubernetes-validate, strict: unknown fields are errors).

Also what a cluster would find out only at run time: the node's command line is one that
`cachemesh serve` parses, every CACHEMESH_* variable is one the config package reads, and the
operator's role allows the calls operator/kube.py makes.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cachemesh.config import parse_size
from tests.deploy.crds import ROOT, load_crds, schema_of, structural_problems

CHART = ROOT / "deploy" / "helm" / "cachemesh"
KUBERNETES = "1.37.0"
# Kinds of other projects' CRDs: no schema in Kubernetes' own set (checked by hand below).
FOREIGN = {"PodMonitor"}


@pytest.fixture(scope="module")
def helm() -> str:
    found = Path(sys.prefix) / "bin" / "helm"
    path = str(found) if found.is_file() else shutil.which("helm")
    if path is None:
        why = "helm is not installed: `python tools/k8s_tools.py` (make test runs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; CI runs the chart tests", pytrace=False)
        pytest.skip(why)
    return path


def render(helm: str, *values: str) -> list[dict[str, Any]]:
    args = [helm, "template", "mesh", str(CHART), "--namespace", "ai", "--include-crds"]
    for value in values:
        args += ["--set", value]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(objects: list[dict[str, Any]], kind: str, component: str | None = None
        ) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (component is None or o["metadata"][
        "labels"].get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def validate_all(objects: list[dict[str, Any]]) -> set[str]:
    kinds = set()
    for obj in objects:
        if obj["kind"] in FOREIGN:
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        kinds.add(obj["kind"])
    return kinds


def test_helm_lint(helm: str):
    for values in ([], ["cluster.externalEtcd.endpoints={etcd-0:2379}"]):
        args = [helm, "lint", "--strict", str(CHART)]
        for value in values:
            args += ["--set", value]
        result = subprocess.run(args, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


def test_default_values_render_valid_kubernetes_objects(helm: str):
    objects = render(helm)
    kinds = validate_all(objects)
    assert kinds == {"CustomResourceDefinition", "DaemonSet", "StatefulSet", "Deployment",
                     "Service", "Secret", "ServiceAccount", "ClusterRole",
                     "ClusterRoleBinding", "NetworkPolicy"}
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    by_name = lambda c: c["metadata"]["name"]  # noqa: E731
    assert sorted(crds, key=by_name) == sorted(load_crds().values(), key=by_name)
    for crd in crds:
        assert structural_problems(schema_of(crd)) == []

    etcd = one(objects, "StatefulSet", "etcd")
    assert etcd["spec"]["replicas"] == 3 and etcd["spec"]["podManagementPolicy"] == "Parallel"
    args = container(etcd, "etcd")["args"]
    members = next(a for a in args if a.startswith("--initial-cluster="))
    assert members.count("=http://") == 3 and "mesh-etcd-2.mesh-etcd-peers.ai.svc:2380" in members

    node = one(objects, "DaemonSet", "node")
    spec = node["spec"]["template"]["spec"]
    server = container(node, "cachemesh")
    env = {e["name"]: e for e in server["env"]}
    assert env["CACHEMESH_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["CACHEMESH_ADVERTISE"]["value"] == "http://$(POD_IP):8008"
    assert env["CACHEMESH_CLUSTER"]["value"] == "etcd://" + ",".join(
        f"mesh-etcd-{i}.mesh-etcd-peers.ai.svc:2379" for i in range(3))
    secret = one(objects, "Secret")
    for var, key in (("CACHEMESH_CLUSTER_TOKEN", "cluster-token"),
                     ("CACHEMESH_API_TOKEN", "api-token"),
                     ("CACHEMESH_INFERENCE_TOKEN", "inference-token")):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]
    assert env["CONTAINER_MEMORY_MIB"]["valueFrom"]["resourceFieldRef"]["resource"] == \
        "limits.memory"
    # the store: the same path on the host and in the container (views are host paths)
    (store,) = [v for v in spec["volumes"] if v["name"] == "store"]
    assert store["hostPath"] == {"path": "/var/lib/cachemesh", "type": "DirectoryOrCreate"}
    mount = next(m for m in server["volumeMounts"] if m["name"] == "store")
    assert mount["mountPath"] == env["CACHEMESH_HOME"]["value"] == "/var/lib/cachemesh"
    # both ports probed: HTTP liveness and startup, readiness through gRPC health (SERVING
    # when started and not draining, serve/adapters/grpc_health.py)
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert server["readinessProbe"]["grpc"] == {"port": 8033}
    assert {"name": "grpc", "containerPort": 8033, "protocol": "TCP"} in server["ports"]
    # SIGTERM: the drain's four waits fit in the grace period
    assert env["CACHEMESH_SERVE_DRAIN_TIMEOUT"]["value"] == "20"
    assert spec["terminationGracePeriodSeconds"] >= 4 * 20
    assert node["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"

    operator = one(objects, "Deployment", "operator")
    op_env = {e["name"]: e for e in container(operator, "operator")["env"]}
    assert op_env["CACHEMESH_URL"]["value"] == "http://mesh.ai.svc:8008"
    assert op_env["CACHEMESH_API_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "api-token"
    assert one(objects, "Service", "node")["spec"]["selector"] == \
        node["spec"]["selector"]["matchLabels"]


def test_an_external_etcd_and_a_podmonitor(helm: str):
    objects = render(helm, "cluster.externalEtcd.endpoints={etcd-a.infra:2379,etcd-b.infra:2379}",
                     "cluster.externalEtcd.tlsSecret=etcd-client",
                     "cluster.externalEtcd.clientCert=true",
                     "metrics.podMonitor.enabled=true", "node.labels.zone=eu-1a",
                     "tokens.existingSecret=mine")
    kinds = validate_all(objects)
    assert "StatefulSet" not in kinds and "NetworkPolicy" not in kinds and "Secret" not in kinds
    node = one(objects, "DaemonSet", "node")
    server = container(node, "cachemesh")
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["CACHEMESH_CLUSTER"] == "etcd://etcd-a.infra:2379,etcd-b.infra:2379"
    assert env["CACHEMESH_ETCD_CACERT"] == "/etc/cachemesh/etcd/ca.crt"
    assert env["CACHEMESH_ETCD_KEY"] == "/etc/cachemesh/etcd/tls.key"
    assert env["CACHEMESH_NODE_LABELS"] == "zone=eu-1a"
    assert server["readinessProbe"]["grpc"] == {"port": 8033}
    monitor = one(objects, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in server["ports"]}
    assert endpoint["authorization"]["credentials"] == {"name": "mine", "key": "metrics-token"}
    assert monitor["spec"]["selector"]["matchLabels"] == node["spec"]["selector"]["matchLabels"]


def test_http_readiness_and_the_drain_checks(helm: str):
    server = container(one(render(helm, "node.grpcHealthProbe=false"), "DaemonSet", "node"),
                       "cachemesh")
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    node = one(render(helm, "node.drainTimeoutSeconds=40",
                      "node.terminationGracePeriodSeconds=160"), "DaemonSet", "node")
    env = {e["name"]: e.get("value") for e in container(node, "cachemesh")["env"]}
    assert env["CACHEMESH_SERVE_DRAIN_TIMEOUT"] == "40"
    for values, why in ((["node.drainTimeoutSeconds=40"], "at least 4 x"),
                        (["node.drainTimeoutSeconds=0"], "at least 1")):
        args = [helm, "template", "mesh", str(CHART)]
        for value in values:
            args += ["--set", value]
        failed = subprocess.run(args, capture_output=True, text=True)
        assert failed.returncode != 0 and why in failed.stderr, failed.stderr


def test_the_validation_can_fail(helm: str):
    node = one(render(helm), "DaemonSet", "node")
    broken = copy.deepcopy(node)
    container(broken, "cachemesh")["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
    broken = copy.deepcopy(node)
    broken["spec"]["template"]["spec"]["hostPathh"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of command and args: $(VAR) of the container's env, $$ -> $."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def test_the_node_command_line_is_one_cachemesh_serve_takes(helm: str, tmp_path: Path):
    from cachemesh.cli import main

    server = container(one(render(helm, "node.workers=3"), "DaemonSet", "node"), "cachemesh")
    env = {"CONTAINER_MEMORY_MIB": "16384"}
    argv = [expand(a, env) for a in server["command"] + server["args"]]
    fake = tmp_path / "bin" / "cachemesh"  # prints what it was started with
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    out = subprocess.run(argv, env={**env, "PATH": f"{fake.parent}:/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["serve", "--host"]
    memory = out[out.index("--memory") + 1]
    assert memory == "13107MiB" and parse_size(memory) == 13107 * 1024**2
    assert out[out.index("--workers") + 1] == "3"
    options = {o for p in main.commands["serve"].params for o in p.opts}
    assert {a for a in out if a.startswith("--")} <= options


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_the_init_container_hands_a_new_store_to_the_servers_user(helm: str, tmp_path: Path):
    node = one(render(helm), "DaemonSet", "node")
    (init,) = node["spec"]["template"]["spec"]["initContainers"]
    store = tmp_path / "store"
    store.mkdir()
    env = {"CACHEMESH_HOME": str(store), "PATH": "/usr/bin:/bin"}
    argv = [expand(a, env) for a in init["command"]]
    for _ in range(2):  # the second time there is nothing to do
        subprocess.run(argv, env=env, check=True)
        assert (store.stat().st_uid, store.stat().st_gid) == (1000, 1000)


def test_every_variable_the_chart_sets_is_one_cachemesh_reads(helm: str):
    config = "".join(p.read_text() for p in (ROOT / "src" / "cachemesh" / "config").glob("*.py"))
    objects = render(helm, "cluster.externalEtcd.endpoints={e:2379}",
                     "cluster.externalEtcd.tlsSecret=t", "cluster.externalEtcd.clientCert=true",
                     "node.labels.zone=a")
    names = set()
    for obj in objects:
        for c in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            names |= {e["name"] for e in c.get("env", []) if e["name"].startswith("CACHEMESH_")}
    assert len(names) > 10
    assert {n for n in names if f'"{n}"' not in config} == set()


def kubelet_env(c: dict[str, Any], secret: dict[str, str], node: str, pod_ip: str
                ) -> dict[str, str]:
    """The container's environment as the kubelet builds it: downward API fields, Secret
    keys, the memory limit in MiB, and $(VAR) of variables defined above."""
    import base64

    env: dict[str, str] = {}
    for e in c["env"]:
        ref = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in ref:
            env[e["name"]] = {"spec.nodeName": node, "status.podIP": pod_ip}[
                ref["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in ref:
            env[e["name"]] = base64.b64decode(secret[ref["secretKeyRef"]["key"]]).decode()
        elif "resourceFieldRef" in ref:
            env[e["name"]] = str(parse_size(c["resources"]["limits"]["memory"]) // 1024**2)
        else:
            raise AssertionError(f"unhandled env entry {e}")
    return env


def test_the_nodes_environment_is_a_cluster_node_named_for_its_kubernetes_node(helm: str):
    from cachemesh.config import Settings

    objects = render(helm)
    server = container(one(objects, "DaemonSet", "node"), "cachemesh")
    env = kubelet_env(server, one(objects, "Secret")["data"], "worker-7.eu-1", "10.4.0.17")
    settings = Settings.from_env(env)
    cluster = settings.cluster
    cluster.check()  # what serve --cluster checks at start
    assert cluster.enabled and cluster.endpoints == tuple(
        f"mesh-etcd-{i}.mesh-etcd-peers.ai.svc:2379" for i in range(3))
    assert cluster.name_or_host() == "worker-7.eu-1"
    assert cluster.advertise_url(settings.serve) == "http://10.4.0.17:8008"
    assert len(cluster.token or "") == 48 and cluster.token != settings.api_token
    assert settings.serve.drain_timeout_s == 20.0
    assert str(settings.home) == "/var/lib/cachemesh"
    assert settings.api_token and settings.inference_token and settings.metrics_token


def test_the_operators_role_allows_what_the_operator_does(helm: str):
    role = one(render(helm), "ClusterRole")

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   for r in role["rules"])

    # operator/kube.py: status patches, node labels, events; kopf: watch, finalizers
    for group, resource, verb in [("cachemesh.io", "datacaches/status", "patch"),
                                  ("cachemesh.io", "models/status", "patch"),
                                  ("", "nodes", "patch"), ("", "events", "create"),
                                  ("cachemesh.io", "datacaches", "watch"),
                                  ("cachemesh.io", "models", "patch")]:
        assert allowed(group, resource, verb), (group, resource, verb)
    assert not allowed("", "secrets", "get")  # its token comes from its own env
    import importlib.util

    assert importlib.util.find_spec("cachemesh.operator.__main__") is not None


def test_the_image_has_what_the_chart_runs():
    """The Dockerfile installs the extras the node (serve, cluster: gRPC health included)
    and the operator import, and exposes the chart's default ports."""
    import tomllib

    dockerfile = (ROOT / "Dockerfile").read_text()
    (extras,) = re.findall(r"'\.\[([a-z0-9,]+)\]'", dockerfile)
    extras_set = set(extras.split(","))
    assert {"serve", "cluster", "operator"} <= extras_set
    defined = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras_set <= set(defined)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.M)
    assert exposed and set(exposed.group(1).split()) == {
        str(values["node"]["port"]), str(values["node"]["grpcPort"])}
