"""Sources as they may be shown: a URL's query values and user info removed.

A presigned URL carries its credential in the query (``X-Amz-Signature``,
``Signature``, ``token``...). The pull needs it, so the cache's spec and the
model registry keep the source whole; everything that renders a source for a
person (the CLI, the API, events, logs) goes through :func:`redact_source`,
and the server's log handlers through :class:`RedactingFilter`, which applies
:func:`redact_text` to every record whatever logger wrote it (httpx logs each
request's full URL at INFO).

Every query value is hidden, not only the ones known to be secret: which keys
a given store signs with is not ours to know. Keys stay, so that a reader can
still tell a presigned URL from a plain one.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

# scheme://anything up to a blank or a quote; the query starts at the first '?'.
_URL_WITH_QUERY = re.compile(r"""\b([A-Za-z][A-Za-z0-9+.-]*://[^\s?#"'<>]*)\?([^\s#"'<>]*)""")


def _redact_query(query: str) -> str:
    """Every value replaced by ``***``; a part without '=' is all value."""
    parts = []
    for item in query.split("&"):
        if not item:
            continue
        key, eq, _ = item.partition("=")
        parts.append(f"{key}=***" if eq else "***")
    return "&".join(parts)


def redact_source(source: str) -> str:
    """``source`` safe to show: for a URI (``scheme://``), the query's values, user
    info and fragment removed; a plain path is returned as it is ('?' is a file-name
    character there). Anything else (``hf://Org/Name@rev``) is left untouched."""
    if not isinstance(source, str) or "://" not in source:
        return source
    try:
        parts = urlsplit(source)
    except ValueError:
        return source.split("?", 1)[0].split("#", 1)[0]
    netloc = parts.netloc.rpartition("@")[2]
    if not parts.query and not parts.fragment and netloc == parts.netloc:
        return source
    query = _redact_query(parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_text(text: str) -> str:
    """``text`` with the query values of every URL in it replaced by ``***``."""
    if "://" not in text or "?" not in text:
        return text
    return _URL_WITH_QUERY.sub(lambda m: f"{m.group(1)}?{_redact_query(m.group(2))}", text)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts URLs in the message and the traceback of a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = redact_text(message)
        if shown != message:
            record.msg, record.args = shown, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def redact_log_handlers(*loggers: logging.Logger) -> None:
    """Put a :class:`RedactingFilter` on every handler of ``loggers`` (the root's by
    default), once."""
    for logger in loggers or (logging.getLogger(),):
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
