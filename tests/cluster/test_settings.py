"""Cluster settings: read from the environment in the config package (config/cluster.py), checked before joining."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh.config import ClusterSettings, ServeSettings, Settings
from cachemesh.errors import InvalidInputError

TOKEN = "0123456789abcdef0123"


def test_off_by_default() -> None:
    cluster = Settings.from_env({}).cluster
    assert not cluster.enabled
    assert cluster.prefix == "/cachemesh/v1/" and cluster.lease_ttl_s == 10


def test_every_variable() -> None:
    cluster = ClusterSettings.from_env({
        "CACHEMESH_CLUSTER": "etcd://10.0.0.5:2379, etcd-1.kube-system.svc:2379,[::1]:2379",
        "CACHEMESH_NODE_NAME": "node-a.zone1",
        "CACHEMESH_ADVERTISE": "https://10.0.0.7:8008/",
        "CACHEMESH_CLUSTER_TOKEN": f" {TOKEN}\n",
        "CACHEMESH_CLUSTER_LEASE_TTL": "4",
        "CACHEMESH_CLUSTER_PREFIX": "/prod/cachemesh/v1/",
        "CACHEMESH_NODE_LABELS": "zone=eu-1a, rack=r7",
        "CACHEMESH_ETCD_CACERT": "/etc/etcd/ca.pem",
        "CACHEMESH_ETCD_CERT": "/etc/etcd/node.pem",
        "CACHEMESH_ETCD_KEY": "/etc/etcd/node-key.pem",
    })
    assert cluster.endpoints == ("10.0.0.5:2379", "etcd-1.kube-system.svc:2379", "[::1]:2379")
    assert cluster.node_name == "node-a.zone1"
    assert cluster.advertise == "https://10.0.0.7:8008"
    assert cluster.token == TOKEN and TOKEN not in repr(cluster)
    assert (cluster.lease_ttl_s, cluster.prefix) == (4, "/prod/cachemesh/v1/")
    assert dict(cluster.labels) == {"zone": "eu-1a", "rack": "r7"}
    assert cluster.tls and cluster.etcd_cacert == Path("/etc/etcd/ca.pem")


@pytest.mark.parametrize("name,value,message", [
    ("CACHEMESH_CLUSTER", "http://10.0.0.5:2379", "etcd://HOST:PORT"),
    ("CACHEMESH_CLUSTER", "etcd://10.0.0.5", "not HOST:PORT"),
    ("CACHEMESH_CLUSTER", "etcd://a:2379,b:99999", "not HOST:PORT"),
    ("CACHEMESH_ADVERTISE", "10.0.0.7:8008", "http(s)://ADDR:PORT"),
    ("CACHEMESH_ADVERTISE", "http://0.0.0.0:8008", "wildcard"),
    ("CACHEMESH_NODE_NAME", "Node_A", "node name"),
    ("CACHEMESH_CLUSTER_LEASE_TTL", "1", "at least 2"),
    ("CACHEMESH_CLUSTER_PREFIX", "cachemesh/v1", "start and end with '/'"),
    ("CACHEMESH_NODE_LABELS", "zone", "KEY=VALUE"),
    ("CACHEMESH_ETCD_CERT", "/etc/etcd/node.pem", "give both or neither"),
])
def test_malformed_values_are_refused(name: str, value: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ClusterSettings.from_env({name: value})


def test_cluster_mode_refuses_to_start_without_a_token() -> None:
    cluster = ClusterSettings.from_env({"CACHEMESH_CLUSTER": "etcd://127.0.0.1:2379"})
    with pytest.raises(InvalidInputError, match="needs CACHEMESH_CLUSTER_TOKEN"):
        cluster.check()
    short = ClusterSettings.from_env({"CACHEMESH_CLUSTER": "etcd://127.0.0.1:2379",
                                      "CACHEMESH_CLUSTER_TOKEN": "short"})
    with pytest.raises(InvalidInputError, match="too short"):
        short.check()
    ok = ClusterSettings.from_env({"CACHEMESH_CLUSTER": "etcd://127.0.0.1:2379",
                                   "CACHEMESH_CLUSTER_TOKEN": TOKEN})
    ok.check()
    with pytest.raises(InvalidInputError, match="needs CACHEMESH_CLUSTER"):
        ClusterSettings(token=TOKEN).check()


def test_tls_files_must_exist(tmp_path: Path) -> None:
    cluster = ClusterSettings.from_env({"CACHEMESH_CLUSTER": "etcd://127.0.0.1:2379",
                                        "CACHEMESH_CLUSTER_TOKEN": TOKEN,
                                        "CACHEMESH_ETCD_CACERT": str(tmp_path / "ca.pem")})
    with pytest.raises(InvalidInputError, match=r"ca\.pem"):
        cluster.check()


def test_advertise_defaults_to_the_serve_address_unless_a_wildcard() -> None:
    cluster = ClusterSettings(endpoints=("127.0.0.1:2379",), token=TOKEN)
    assert cluster.advertise_url(ServeSettings(host="10.1.2.3", port=9000)) == \
        "http://10.1.2.3:9000"
    with pytest.raises(InvalidInputError, match="--advertise"):
        cluster.advertise_url(ServeSettings(host="0.0.0.0"))
