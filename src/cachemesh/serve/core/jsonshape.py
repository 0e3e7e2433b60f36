"""The shape of JSON values that are kept or passed on as Python objects: how deep they
nest and how many values they hold (:func:`check_json`).

orjson, the stdlib and pydantic all refuse nesting deeper than about a thousand
levels, but a document just under that still reaches code that recurses (pickle
on the way to a worker, deep copies, comparisons). The parameters of a model spec
(``documents.py``) and of an inference request (``v2_codec.py``) are held to
:data:`MAX_JSON_DEPTH` levels and :data:`MAX_JSON_ITEMS` values. Tensor data is
not walked: it becomes a numpy array at once.
"""

from __future__ import annotations

from typing import Any

from ...errors import RequestTooLargeError

MAX_JSON_DEPTH = 32
MAX_JSON_ITEMS = 10_000


def check_json(value: Any, what: str, *, max_depth: int = MAX_JSON_DEPTH,
               max_items: int = MAX_JSON_ITEMS) -> Any:
    """``value`` unchanged, or :class:`RequestTooLargeError` when it nests deeper than
    ``max_depth`` or holds more than ``max_items`` values. Iterative: a hostile
    document cannot exhaust the stack here."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > max_items:
            raise RequestTooLargeError(f"{what} holds more than {max_items} values", max_items)
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > max_depth:
            raise RequestTooLargeError(f"{what} nests deeper than {max_depth} levels", max_depth)
        stack.extend((child, depth + 1) for child in children)
    return value
