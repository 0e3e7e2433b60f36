"""Declaring caches: specs checked before anything is written, conflicts refused."""

from __future__ import annotations

import pytest

import cachemesh
from cachemesh.caches import make_spec
from cachemesh.errors import ConflictError, InvalidInputError


def test_spec_conflict_and_overlapping_paths_are_refused(caches, make_tree, settings):
    a = make_tree("a", {"f": b"1"})
    b = make_tree("b", {"f": b"2"})
    cachemesh.pull(str(a), name="m", path="models/m", settings=settings)
    with pytest.raises(ConflictError, match="different spec"):
        cachemesh.pull(str(b), name="m", path="models/m", settings=settings)
    with pytest.raises(ConflictError, match="overlaps"):
        cachemesh.pull(str(b), name="n", path="models/m/sub", settings=settings)
    with pytest.raises(ConflictError, match="overlaps"):
        cachemesh.pull(str(b), name="n", path="models", settings=settings)
    assert [c.name for c in caches.list()] == ["m"]


@pytest.mark.parametrize("field,value", [
    ("name", "../etc"), ("bucket", "a/b"), ("path", "../../x"), ("path", "a\\b"),
    ("size_limit_gib", -1),
])
def test_bad_spec_is_refused_before_anything_is_written(caches, make_tree, settings, field, value):
    origin = make_tree("m", {"f": b"1"})
    kwargs = {"name": "ok", field: value}
    with pytest.raises(InvalidInputError):
        cachemesh.pull(str(origin), settings=settings, **kwargs)
    assert caches.list() == []
    assert not any(caches.store.views.root.iterdir())


def test_make_spec_errors_are_readable():
    with pytest.raises(InvalidInputError, match=r"name: .*invalid cache name"):
        make_spec(name="../x", source="/tmp")
