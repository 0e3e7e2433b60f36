"""Caches declared cluster-wide (preheat): placeholder, filled in below."""

from __future__ import annotations

from typing import Any


class Preheat:
    def __init__(self, node: Any) -> None:
        self.node = node

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
