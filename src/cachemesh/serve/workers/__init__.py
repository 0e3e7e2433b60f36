"""The worker processes: the process itself (``worker.py``), its handle in the server
(``workers.py``), and what passes between them (``messages.py``, framed by ``ipc.py``).

This package imports nothing else from ``cachemesh.serve``: the core depends on it,
never the other way round.
"""
