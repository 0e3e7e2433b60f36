"""The data caches a node is asked to pull over the control API: the service
(``datacache_service.py``), the process that pulls one (``pull_child.py``), and in
cluster mode the blob index and the caches preheated cluster-wide.
"""
