"""Cluster mode: any node answers any request (the node's ClusterContext is in
``cluster_mode.py``; its agreements live in etcd through ``registry_etcd.py`` and
:mod:`cachemesh.cluster`).
"""
