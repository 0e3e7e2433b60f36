"""CacheCatalog on its own: the rows a declaration writes, events, kept hub trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachemesh.caches import PENDING
from cachemesh.caches.catalog import CacheCatalog
from cachemesh.errors import ConflictError
from cachemesh.store.db import Database


@pytest.fixture
def catalog(tmp_path: Path) -> CacheCatalog:
    return CacheCatalog(Database(tmp_path / "meta.db"))


def declare(catalog: CacheCatalog, name: str, path: str, bucket: str = "b") -> dict | None:
    return catalog.declare(name, bucket, path, f"file:///{name}", {"name": name}, "created")


def test_a_declaration_writes_a_pending_row_and_its_event_once(catalog: CacheCatalog):
    assert declare(catalog, "m", "models/m") is None
    row = catalog.row("m")
    assert row is not None and (row["status"], row["bucket"], row["path"]) == (
        PENDING, "b", "models/m")
    assert json.loads(row["spec"]) == {"name": "m"}
    again = declare(catalog, "m", "elsewhere")  # the existing row, nothing written
    assert again is not None and again["path"] == "models/m"
    assert [(e["kind"], e["message"]) for e in catalog.events("m")] == [("created", "created")]


def test_overlapping_paths_in_a_bucket_are_refused(catalog: CacheCatalog):
    declare(catalog, "m", "models/m")
    for name, path in (("inner", "models/m/sub"), ("outer", "models")):
        with pytest.raises(ConflictError, match="overlaps cache 'm'"):
            declare(catalog, name, path)
        assert not catalog.exists(name)
    assert declare(catalog, "other-bucket", "models", bucket="c") is None
    assert catalog.bucket_counts() == {"b": 1, "c": 1}


def test_update_delete_and_statuses(catalog: CacheCatalog):
    declare(catalog, "m", "m")
    before = catalog.row("m")
    assert before is not None
    catalog.update("m", status="Loading", error="x")
    after = catalog.row("m")
    assert after is not None and (after["status"], after["error"]) == ("Loading", "x")
    assert after["updated_at"] >= before["updated_at"]
    assert catalog.names("Loading") == ["m"] and catalog.statuses() == {"m": "Loading"}
    catalog.delete("m")
    assert catalog.row("m") is None and catalog.events("m") == []


def test_kept_trees_are_forgotten_once_no_cache_holds_their_commit(catalog: CacheCatalog):
    catalog.keep_trees("models--org--m", {"c1": "{}", "c2": "{}"}, held=set())
    assert catalog.trees("models--org--m").keys() == {"c1", "c2"}
    catalog.keep_trees("models--org--m", {"c3": "{}"}, held={"c1"})
    assert catalog.trees("models--org--m").keys() == {"c1", "c3"}
    assert catalog.trees("models--org--other") == {}
