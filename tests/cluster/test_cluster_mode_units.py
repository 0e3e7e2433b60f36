"""Pure parts of cluster mode's serving side: the command's flags over the environment,
and whether a node has a model's local source."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh.cli.serve import with_cluster_flags
from cachemesh.config import Settings
from cachemesh.errors import InvalidInputError
from cachemesh.serve.cluster_mode import missing_local_source
from cachemesh.serve.documents import make_document


def test_flags_win_over_the_environment(tmp_path: Path) -> None:
    base = Settings.from_env({"CACHEMESH_HOME": str(tmp_path),
                              "CACHEMESH_CLUSTER": "etcd://10.0.0.1:2379",
                              "CACHEMESH_NODE_NAME": "from-env"})
    assert with_cluster_flags(base) is base  # no flag: nothing changes
    got = with_cluster_flags(base, cluster="etcd://127.0.0.1:2379,127.0.0.2:2379",
                             node_name="n1", advertise="https://10.1.1.1:8443").cluster
    assert got.endpoints == ("127.0.0.1:2379", "127.0.0.2:2379")
    assert (got.node_name, got.advertise) == ("n1", "https://10.1.1.1:8443")
    with pytest.raises(InvalidInputError, match="etcd://"):
        with_cluster_flags(base, cluster="http://127.0.0.1:2379")
    with pytest.raises(InvalidInputError, match="go together"):
        with_cluster_flags(base, etcd_cert=tmp_path / "c.pem")


def test_missing_local_source(tmp_path: Path) -> None:
    here = tmp_path / "model"
    here.mkdir()

    def doc(source: str):
        return make_document({"versions": {"v1": {"source": source}}}, "m")

    assert missing_local_source(doc(str(here))) is None
    assert missing_local_source(doc(here.as_uri())) is None
    assert missing_local_source(doc("hf://org/name")) is None  # not local: every node can
    why = missing_local_source(doc(str(tmp_path / "elsewhere")))
    assert why is not None and "v1" in why and "does not exist on this node" in why
    assert missing_local_source(doc((tmp_path / "gone").as_uri())) is not None
