"""Which version of a model answers a request: a pure decision over its document.

In order (the first that applies decides):

1. a version the request names itself (the V2 path ``/versions/{v}``): a label
   or an alias; an unknown one is a 404, never a silent fallback;
2. the document's ``routes``, first match wins: a request header (A/B tests,
   ``x-model-version: v2``) or a key of the V2 request's ``parameters``;
3. the ``traffic`` shares: a weighted draw (a canary's 10 %).

Every protocol adapter (V2 REST, V2 gRPC, OpenAI) reaches this through
:meth:`ModelService.route <cachemesh.serve.core.service.ModelService.route>`,
so a route works the same whichever protocol the request came by. The draw is
independent per request (as Istio's weighted routes are): a client that sends
two requests may reach two versions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import ModelNotFoundError
from .documents import ModelDoc, RouteRule


@dataclass(frozen=True, slots=True)
class Decision:
    version: str  # the concrete version label
    reason: str  # "path", "route 0: header x-model-version=v2", "traffic 10%"


class _Rule:
    __slots__ = ("header", "index", "parameter", "test", "version", "why")

    def __init__(self, index: int, rule: RouteRule, version: str) -> None:
        self.index = index
        self.header = rule.header.lower() if rule.header else None
        self.parameter = rule.parameter
        self.version = version
        self.why = f"route {index}: {rule.describe()}"
        self.test: Callable[[Any], bool]
        if rule.value is not None:
            want = rule.value
            if isinstance(want, str):
                # A parameter given as 2 matches a rule written "2" (and true, "true").
                self.test = lambda got: (got == want if isinstance(got, str)
                                         else _text(got) == want)
            else:
                self.test = lambda got: type(got) is type(want) and got == want
        elif rule.prefix is not None:
            prefix = rule.prefix
            self.test = lambda got: isinstance(got, str) and got.startswith(prefix)
        else:
            match = re.compile(rule.pattern or "").fullmatch
            self.test = lambda got: isinstance(got, str) and match(got) is not None


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return None


class Router:
    """A document compiled for the hot path."""

    def __init__(self, doc: ModelDoc, draw: Callable[[], float] = random.random) -> None:
        self.doc = doc
        self._draw = draw
        self._names = {**{v: v for v in doc.versions}, **doc.aliases}
        self._rules = [_Rule(i, r, doc.target(r.version) or r.version)
                       for i, r in enumerate(doc.routes)]
        shares = [(v, p) for v, p in doc.traffic.items() if p > 0]
        self._cumulative: list[tuple[float, str]] = []
        total = 0
        for version, share in shares:
            total += share
            self._cumulative.append((total / 100.0, version))
        # One version, no routes: nothing to decide (the common case).
        self._only = (Decision(shares[0][0], "traffic 100%")
                      if len(shares) == 1 and not self._rules else None)

    def choose(self, version: str | None = None, headers: Mapping[str, str] | None = None,
               parameters: Mapping[str, Any] | None = None) -> Decision:
        if version is not None:
            target = self._names.get(version)
            if target is None:
                raise ModelNotFoundError(self.doc.name, version)
            return Decision(target, "path")
        if self._only is not None:
            return self._only
        for rule in self._rules:
            if rule.header is not None:
                got = _header(headers, rule.header)
            else:
                got = parameters.get(rule.parameter) if parameters else None  # type: ignore[arg-type]
            if got is not None and rule.test(got):
                return Decision(rule.version, rule.why)
        x = self._draw()
        for bound, label in self._cumulative:
            if x < bound:
                return Decision(label, f"traffic {self.doc.traffic[label]}%")
        label = self._cumulative[-1][1]  # x rounds up to 1.0
        return Decision(label, f"traffic {self.doc.traffic[label]}%")


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    # Adapters pass names in lower case (as ASGI and gRPC metadata have them).
    return headers.get(name) if headers else None
