"""Large numeric arrays of a JSON request body, parsed straight into numpy.

orjson makes a Python object of every value: a 62 MiB body of ``[[0],[0],...]``
became about 2 GB of lists and held the event loop for seconds (issue 22). So
:func:`split` cuts each long run of the body that holds only number characters,
brackets, commas and blanks (a *span*, from its first ``[`` to its last ``]``)
out of the body and puts a placeholder integer in its place; orjson then parses
what is left, which is small. The codec takes a placeholder that it finds as a
tensor's ``data`` (or gRPC-JSON ``contents``) from here: :func:`parse` checks
the span with numpy (JSON's number syntax, one regular nesting) and reads the
numbers with ``np.fromstring``, slice by slice, so that no Python object is
made per number and the GIL is never held for long.

Why a placeholder cannot change what the body means: it is a number, so it
cannot move a string's bounds; the body must not already hold its prefix; and
a span is used only where orjson saw its placeholder as a tensor's values, and
only if it is itself a valid JSON array. Everything else (a placeholder inside
a string or a parameter, integers past 10**18) makes the codec parse the whole
body with orjson instead (:class:`Fallback`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Spans shorter than this stay in the body for orjson: not worth it.
MIN_SPAN = 32 * 1024
_SLICE = 512 * 1024  # bytes of span parsed per numpy call: short holds of the GIL
_PREFIX = b"1844674407370954"  # + 4 digits: within uint64, which orjson reads as int
_MAX_SPANS = 10_000
_MAX_DEPTH = 64  # numpy's limit on dimensions
_MAX_NUMBER = 64  # characters: '-1.2345678901234567e-308' is 24

_SPAN_CHARS = np.zeros(256, bool)
_SPAN_CHARS[list(b"0123456789+-.eE,[] \t\r\n")] = True
_BLANK = np.zeros(256, bool)
_BLANK[list(b" \t\r\n")] = True
_NUMBER = np.zeros(256, bool)
_NUMBER[list(b"0123456789+-.eE")] = True
_DIGIT = np.zeros(256, bool)
_DIGIT[list(b"0123456789")] = True
OPEN, CLOSE, COMMA, NUM = 0, 1, 2, 3
_TYPE = np.full(256, NUM, np.uint8)
_TYPE[ord("[")], _TYPE[ord("]")], _TYPE[ord(",")] = OPEN, CLOSE, COMMA


class Fallback(Exception):
    """This body is for orjson after all."""


class BadSpan(ValueError):
    """A span that is no regular JSON array of numbers (the message says what)."""


class NotIntegers(BadSpan):
    """Integers were wanted; the span has a '.' or an exponent."""


class OutOfRange(BadSpan):
    """An integer that the wanted type cannot hold."""


@dataclass(frozen=True, slots=True)
class Span:
    text: memoryview


def split(body: bytes) -> tuple[bytes, dict[int, Span]]:
    """``body`` with its long numeric arrays replaced by placeholders, and the arrays
    by placeholder; ``(body, {})`` when there is none, or when it cannot be done."""
    if len(body) < MIN_SPAN or _PREFIX in body:
        return body, {}
    ok = _SPAN_CHARS[np.frombuffer(body, np.uint8)]
    # A run of at least 2 * B such characters holds a whole aligned block of B.
    block = MIN_SPAN // 2
    blocks = len(ok) // block
    full = ok[:blocks * block].reshape(blocks, block).all(axis=1)
    pieces: list[bytes | memoryview] = []
    spans: dict[int, Span] = {}
    view = memoryview(body)
    done, b = 0, 0
    while b < blocks:
        if not full[b]:
            b += 1
            continue
        e = b
        while e < blocks and full[e]:
            e += 1
        # The run's true ends lie in the blocks on either side (not full, or none).
        start = 0
        if b:
            start = (b - 1) * block + int(np.flatnonzero(~ok[(b - 1) * block:b * block])[-1]) + 1
        stops = np.flatnonzero(~ok[e * block:(e + 1) * block])
        end = e * block + int(stops[0]) if len(stops) else len(ok)
        b = e + 1
        first, last = body.find(b"[", start, end), body.rfind(b"]", start, end)
        if first < 0 or last + 1 - first < block:
            continue
        if len(spans) == _MAX_SPANS:
            return body, {}
        token = int(_PREFIX + b"%04d" % len(spans))
        pieces += [view[done:first], b"%d" % token]
        spans[token] = Span(view[first:last + 1])
        done = last + 1
    if not spans:
        return body, {}
    pieces.append(view[done:])
    return b"".join(pieces), spans


def parse(span: Span, dtype: np.dtype) -> tuple[np.ndarray, tuple[int, ...]]:
    """The numbers of ``span`` as ``dtype``, flat, and the shape of their nesting.
    :class:`BadSpan` if it is no regular JSON array of numbers, or if a value does
    not fit an integer ``dtype``. Each slice is cast as it is read: the float64 or
    int64 of the parse never exists for the whole span."""
    integers = dtype.kind in "iu"
    text = span.text
    types: list[np.ndarray] = []
    values: list[np.ndarray] = []
    a = 0
    while a < len(text):
        b = len(text)
        if b - a > _SLICE:  # cut after a bracket or comma: no number is split
            window = np.frombuffer(text[a + _SLICE:min(b, a + 2 * _SLICE)], np.uint8)
            cuts = np.flatnonzero(~(_NUMBER[window] | _BLANK[window]))
            if not len(cuts):
                raise Fallback  # a number of half a megabyte: orjson's business
            b = a + _SLICE + int(cuts[0]) + 1
        t, v = _parse_slice(np.frombuffer(text[a:b], np.uint8), integers)
        types.append(t)
        if v is not None:
            if integers:
                limits = np.iinfo(dtype)
                if int(v.min()) < limits.min or int(v.max()) > limits.max:
                    raise OutOfRange("a value is out of range")
            values.append(v.astype(dtype, copy=False))
        a = b
    tokens = np.concatenate(types)
    del types
    shape = _nesting(tokens)
    count = sum(len(v) for v in values)
    if shape is None or not _regular(tokens, shape) or count != math.prod(shape):
        raise BadSpan("data is not a regular (rectangular) array of numbers")
    del tokens
    flat = values[0] if len(values) == 1 else np.concatenate(values) if values \
        else np.empty(0, dtype)
    return flat, shape


def _shift_right(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    out[0] = False
    out[1:] = x[:-1]
    return out


def _shift_left(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    out[-1] = False
    out[:-1] = x[1:]
    return out


def _parse_slice(c: np.ndarray, integers: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Token types of one slice, and its numbers (None when it has none)."""
    blank = _BLANK[c]
    if blank.any():
        gap = _shift_right(blank)[~blank]
        c = c[~blank]
        num = _NUMBER[c]
        if (gap[1:] & num[1:] & num[:-1]).any():
            raise BadSpan("data holds a blank inside a number")
    else:
        num = _NUMBER[c]
    if not len(c):
        return np.empty(0, np.uint8), None
    start = num & ~_shift_right(num)
    types = _TYPE[c][~num | start]
    if not start.any():
        return types, None
    _check_numbers(c, num, start)
    if integers and ((c == ord(".")) | (c == ord("e")) | (c == ord("E"))).any():
        raise NotIntegers("data holds floating-point values")
    spaced = np.where(num, c, np.uint8(32))
    try:
        numbers = np.fromstring(spaced.tobytes(), np.int64 if integers else np.float64, sep=" ")
    except ValueError:
        raise BadSpan("data is not an array of numbers") from None
    if len(numbers) != int(np.count_nonzero(start)):
        raise BadSpan("data is not an array of numbers")
    if integers and len(numbers):
        if int(numbers.max()) >= 10**18 or int(numbers.min()) <= -10**18:
            raise Fallback  # past what is parsed exactly here (UINT64's upper half)
    elif not np.isfinite(numbers).all():
        raise BadSpan("data holds a number too large for a double")
    return types, numbers


def _check_numbers(c: np.ndarray, num: np.ndarray, start: np.ndarray) -> None:
    """JSON's number syntax, ``-?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?``, checked by
    neighbours: what JSON refuses is refused here too (``+1``, ``.5``, ``1.``, ``01``)."""
    digit = _DIGIT[c]
    minus, plus, dot = c == ord("-"), c == ord("+"), c == ord(".")
    exp = (c == ord("e")) | (c == ord("E"))
    before_digit, after_digit = _shift_left(digit), _shift_right(digit)
    after_exp = _shift_right(exp)
    end = num & ~_shift_left(num)
    if int((np.flatnonzero(end) - np.flatnonzero(start)).max()) >= _MAX_NUMBER:
        raise Fallback  # strtod's time grows with a number's length; orjson's does not
    bad = (start & ~(digit | minus)) | (end & ~digit)
    bad |= minus & ~(start | after_exp)
    bad |= plus & ~after_exp
    bad |= (minus | plus) & ~before_digit
    bad |= dot & ~(after_digit & before_digit)
    bad |= exp & ~after_digit
    # A leading zero followed by a digit ("01", "-01").
    lead = start | (_shift_right(start & minus))
    bad |= (c == ord("0")) & lead & before_digit
    if bad.any():
        raise BadSpan("data holds something that is not a JSON number")
    # At most one '.' and one exponent per number, the '.' first: no '.' or 'e' may
    # follow an 'e', nor a '.' a '.', within one number.
    marks = np.flatnonzero(dot | exp)
    if len(marks) > 1:
        token = np.cumsum(start, dtype=np.int64)[marks]
        same = token[1:] == token[:-1]
        follows_exp = exp[marks[:-1]]
        if (same & (follows_exp | dot[marks[1:]])).any():
            raise BadSpan("data holds something that is not a JSON number")


def _nesting(t: np.ndarray) -> tuple[int, ...] | None:
    """The shape that the first element at each depth implies, or None."""
    if not len(t) or t[0] != OPEN:
        return None
    depth = int(np.argmax(t != OPEN)) if (t != OPEN).any() else len(t)
    if depth > _MAX_DEPTH or depth >= len(t):
        return None
    counts = [0] * depth
    length = 1  # tokens of one element one level down (a number: 1)
    for k in range(depth, 0, -1):  # the first array of level k opens at index k - 1
        if t[k] == CLOSE:
            if k != depth:
                return None
            counts[k - 1], length = 0, 2
            continue
        separators = t[k + length::length + 1]
        more = separators != COMMA
        if not more.any():
            return None
        counts[k - 1] = 1 + int(np.argmax(more))
        length = 1 + counts[k - 1] * (length + 1)
    return tuple(counts)


def _length(shape: tuple[int, ...]) -> int:
    length = 1
    for c in reversed(shape):
        length = 1 + c * (length + 1) if c else 2
    return length


def _regular(t: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether ``t`` is exactly the tokens of a nested array of ``shape``."""
    if not shape:
        return len(t) == 1 and t[0] == NUM
    c = shape[0]
    if c == 0:
        return len(t) == 2 and t[0] == OPEN and t[1] == CLOSE
    inner = _length(shape[1:])
    period = inner + 1
    if len(t) != 1 + c * period or t[0] != OPEN or t[-1] != CLOSE:
        return False
    if not _regular(t[1:1 + inner], shape[1:]):
        return False
    if c > 1:
        row = t[1:1 + period]
        if row[-1] != COMMA:
            return False
        rows = t[1:1 + (c - 1) * period].reshape(c - 1, period)
        step = max(1, _SLICE // period)
        for i in range(0, c - 1, step):
            if not (rows[i:i + step] == row).all():
                return False
        last = t[1 + (c - 1) * period:-1]
        if not (last == t[1:1 + inner]).all():
            return False
    return True
