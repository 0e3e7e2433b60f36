"""The Kubernetes operator: DataCache and Model objects into the mesh, through the control API.

    mapping.py    the CRDs' fields <-> the control API's (the only place)
    handlers.py   the reconcilers: plain async functions over the objects' dicts
    kube.py       the Kubernetes side effects behind a small interface, and the Pod's client
    main.py       kopf's decorators over the reconcilers (needs the ``operator`` extra)

The CRDs are in deploy/helm/cachemesh/crds/; docs/kubernetes.md is the guide.
"""
