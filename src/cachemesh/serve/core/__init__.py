"""The protocol-free core of the model server: models, versions and copies on worker slots.

No module here parses a protocol or imports one from ``adapters/``; the adapters call
:class:`~cachemesh.serve.core.service.ModelService`, and cluster mode (``cluster/``)
is reached only through the ClusterContext the service is given.
"""
