"""config.py: the environment read in one place."""

from __future__ import annotations

import pytest

from cachemesh.config import worker_threads


@pytest.mark.parametrize("environ,threads", [
    ({"OMP_NUM_THREADS": "3"}, 3),
    ({}, 0),  # unset: the library picks
    ({"OMP_NUM_THREADS": "many"}, 0),
    ({"OMP_NUM_THREADS": "-2"}, 0),
])
def test_a_workers_thread_budget_comes_from_omp_num_threads(environ, threads):
    assert worker_threads(environ) == threads


def test_it_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert worker_threads() == 5
