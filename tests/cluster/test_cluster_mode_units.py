"""Pure parts of cluster mode's serving side: the command's flags over the environment,
and whether a node has a model's local source."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh.cli.serve import with_cluster_flags
from cachemesh.config import Settings
from cachemesh.errors import InvalidInputError
from cachemesh.serve.cluster.cluster_mode import missing_local_source
from cachemesh.serve.core.documents import make_document


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


def test_a_declared_version_adopts_files_an_earlier_pull_left(tmp_path: Path) -> None:
    """Cluster mode prepares a version at declaration only when its files are already in
    this node's store (a node restarted after it served the model): no download, and the
    node record's ``prepared`` says so. Other versions stay unpulled."""
    import asyncio
    import shutil

    from cachemesh.caches import Caches
    from cachemesh.serve.core.documents import VersionSpec, cache_name
    from cachemesh.serve.core.metrics import Metrics
    from cachemesh.serve.core.prepare import Preparer
    from cachemesh.serve.core.shared import Background, Shared
    from cachemesh.serve.core.state import NOT_HERE, UNLOADED, Version

    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copy(Path(__file__).parents[1] / "blackbox" / "toy_runtime.py", origin / "toy.py")
    (origin / "weights.bin").write_bytes(b"\0" * 1024)
    settings = Settings.from_env({"CACHEMESH_HOME": str(tmp_path / "home")})
    caches = Caches(settings)
    spec = VersionSpec(source=str(origin), runtime="custom", parameters={"class": "toy:Toy"})

    def version(model: str) -> Version:
        v = Version(model=model, label="default", spec=spec, cache=cache_name(model, "default"),
                    bucket="models")
        v.phase, v.reason = UNLOADED, NOT_HERE  # as Deployments declares it in a cluster
        return v

    class NoWorkers:
        workers: list[object] = []
        budget = 1 << 30

    async def run() -> tuple[Version, Version]:
        preparer = Preparer(Shared(settings, caches, Metrics(), Background()),
                            NoWorkers(), {})  # type: ignore[arg-type]
        await preparer.prepare(version("m"))  # the earlier pull, on this node
        again, other = version("m"), version("n")
        await preparer.prepare_if_present(again)
        await preparer.prepare_if_present(other)
        return again, other

    again, other = asyncio.run(run())
    assert again.resolved is not None and again.view is not None
    assert (again.phase, again.reason) == (UNLOADED, None)
    assert other.resolved is None and (other.phase, other.reason) == (UNLOADED, NOT_HERE)
    assert not caches.exists("n")  # nothing pulled, no cache made for it
