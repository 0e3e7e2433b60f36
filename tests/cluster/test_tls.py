"""etcd over TLS with client certificates (--etcd-cacert/--etcd-cert/--etcd-key), from a
CA the test makes itself."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from cachemesh.cluster import EtcdKV
from cachemesh.config import Settings
from cachemesh.errors import ClusterError
from tests.cluster.conftest import TOKEN, require_etcd
from tests.cluster.etcd_server import EtcdServer, TLSFiles


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[EtcdServer, trustme.CA, Path]]:
    require_etcd()
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_pem.write_to_path(str(certs / "server-key.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    server = EtcdServer(tmp_path / "etcd", tls=TLSFiles(
        cert=certs / "server.pem", key=certs / "server-key.pem", client_ca=certs / "ca.pem"))
    try:
        server.start()
        yield server, ca, certs
    finally:
        server.stop()


def test_client_certificate_admits_and_its_absence_refuses(
        tls_etcd: tuple[EtcdServer, trustme.CA, Path]) -> None:
    server, ca, certs = tls_etcd
    client = ca.issue_cert("node-a")
    client.private_key_pem.write_to_path(str(certs / "node-key.pem"))
    client.cert_chain_pems[0].write_to_path(str(certs / "node.pem"))
    env = {"CACHEMESH_CLUSTER": server.url, "CACHEMESH_CLUSTER_TOKEN": TOKEN,
           "CACHEMESH_ETCD_CACERT": str(certs / "ca.pem")}
    with_cert = Settings.from_env({**env, "CACHEMESH_ETCD_CERT": str(certs / "node.pem"),
                                   "CACHEMESH_ETCD_KEY": str(certs / "node-key.pem")}).cluster
    without_cert = Settings.from_env(env).cluster
    with_cert.check()

    async def scenario() -> None:
        kv = EtcdKV.from_settings(with_cert, timeout=3.0)
        assert kv.endpoints.startswith("https://")
        revision = await kv.put("/tls/k", b"v")
        found = await kv.get("/tls/k")
        assert found is not None and found.value == b"v"
        async with contextlib.aclosing(kv.watch("/tls/k", start_revision=revision)) as events:
            event = await asyncio.wait_for(anext(events), 5.0)
        assert event.kv.value == b"v"
        await kv.close()
        anonymous = EtcdKV.from_settings(without_cert, timeout=3.0)
        # TLS 1.3: etcd's refusal arrives as an alert (SSLError) or a closed connection.
        with pytest.raises(ClusterError, match="TLS"):
            await anonymous.get("/tls/k")
        await anonymous.close()

    asyncio.run(scenario())
