"""The web page, ``/ui``: a read-only view of caches, models, memory and activity.

Three files shipped in the package (``ui_static/``: ``index.html``, ``ui.js``,
``ui.css``), no build step and nothing fetched from elsewhere. The page reads
the same APIs any client reads (``/api/v1/datacaches?usage=true``,
``/api/v1/models``, ``/api/v1/nodes``, ``/metrics``)
and follows pulls through ``/api/v1/datacaches/{name}/events`` with
``fetch()``, which, unlike ``EventSource``, can send a bearer token.

The assets themselves are open (``auth.RULES``: they hold no data); every
figure on the page comes from an API that checks the caller's token as it
always does. Each answer carries a Content-Security-Policy that allows this
origin's script, style and connections only: no inline script, no other host.
The page puts every server string into the DOM as text (``textContent``), never
as markup, and the policy is the second line of defence, not the first.

In cluster mode (``cluster`` set in ``/api/v1/nodes``) the page adds the nodes: health
(ok / degraded / draining / stale record, as the API says), labels, memory against each
node's budget, the copies each holds, what it cannot load; and a column naming the nodes
that hold each model version (``status.nodes``). Caches, workers and the chart stay this
node's (node-local), and their headings say which node that is. A lone server lists
itself as the one node; the page shows no nodes table there, which would repeat the
memory section.

Routes (plain Starlette, added to the root app beside ``/metrics``)::

    GET /ui             index.html
    GET /ui/ui.js       the script
    GET /ui/ui.css      the style (nothing else under ui_static/ is served)
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "ui.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
       " img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files, fetched once per page load; a new release must not run old script.
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("ui_static", name).read_bytes()


def _asset(name: str) -> Response:
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)


def _endpoint(name: str) -> Any:
    async def serve(request: Request) -> Response:
        return _asset(name)

    return serve


async def slash(request: Request) -> Response:
    return RedirectResponse("/ui", 308)


def routes() -> list[Route]:
    """One route per file, no path parameter: nothing else can be asked for."""
    files = [Route(f"/ui/{name}", _endpoint(name), methods=["GET"])
             for name in ASSETS if name != "index.html"]
    return [Route("/ui", _endpoint("index.html"), methods=["GET"]),
            Route("/ui/", slash, methods=["GET"]), *files]
