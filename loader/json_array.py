"""The elements of a top-level JSON array, read one at a time with a bound on what one may hold.

A parser that builds each element (ijson's ``items``) holds the whole of a 1 GB element, or of a 1 GB
string inside it, before anyone can look at its size. Here simplejson's C decoder checks each element
and finds its end in a window of text; an element that goes on past the window is followed by a
scanner that only tracks strings and nesting, keeping its text only while it is within
ETL_MAX_RECORD_BYTES: a longer one is read past holding its first characters for the reject's sample,
exactly as an over-long NDJSON line is. An element within the limit costs what checking it costs
(its text, up to 4 bytes a character, and the decoder's objects), as a line validated by a worker does.

The scanner skips a string's body with one regular-expression match and counts the brackets of long
stretches without strings in bulk (numpy), so a dense over-long element (``[],[],...`` or ``"\\"\\"..."``)
is read past about as fast as a plain one.

Each element comes as its own text, not re-encoded: numbers, escapes and duplicate keys reach
validation and the database as the source wrote them, as an NDJSON line's do.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import simplejson

from .errors import SourceError

#: Bytes read at a time.
READ_BYTES = 1 << 16
_BOM = "\ufeff"
_SPACE = re.compile(r"[ \t\r\n]*")
#: Outside a string only these characters change the skipping scanner's state.
_OUTSIDE = re.compile(r'["\[\]{}]')


@dataclass(frozen=True, slots=True)
class Element:
    """One element: its JSON ``text`` when ``whole``; else it was longer than the limit, ``head`` is its
    first characters and ``text`` empty. ``size``: its length in the source, in bytes (counted in characters
    where that is far under the limit: the caller only compares it with the limit)."""

    text: str
    size: int
    whole: bool = True
    head: str = ""


class ArraySyntaxError(SourceError):
    """The text is not one JSON array of elements: what is wrong and after which element."""


def _no_constant(name: str) -> None:
    raise ArraySyntaxError(f"{name} is not a JSON number")


#: A number cut by the end of a read parses as its first part followed by at most this many characters
#: that are not a number ("1.", "1.5e", "1.5e+"): an element ending that close to the end is read again.
_NUMBER_TAIL = 4
#: Only checks the text and finds its end: numbers stay text (no Decimal made for nothing).
_DECODER = simplejson.JSONDecoder(parse_float=str, parse_int=str, parse_constant=_no_constant)


class _Text:
    """The source's text from ``pos`` on, decoded as it is read (a UTF-8 sequence may span two reads)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._decode = codecs.getincrementaldecoder("utf-8")("strict").decode
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.more()
        self.buf = self.buf.removeprefix(_BOM)

    def more(self, at_least: int = 1) -> bool:
        """Read on, about ``at_least`` characters more in one join (keeping the text from ``pos``); False
        at the end of the file."""
        pieces = [self.buf[self.pos:]]
        got = 0
        while got < at_least and not self.eof:
            data = self._f.read(max(READ_BYTES, min(at_least - got, 1 << 24)))
            text = self._decode(data, final=not data)
            self.eof = not data
            pieces.append(text)
            got += len(text)
        self.buf, self.pos = "".join(pieces), 0
        return got > 0

    def skip_space(self) -> str:
        """The next character after whitespace ("" at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""


def elements(f: IO[bytes], limit: int, head: int) -> Iterator[Element]:
    """The array's elements in order; raises SourceError on text that is not one JSON array.

    An element longer than ``limit`` is read past holding at most about ``limit`` characters of it (plus
    one read), and comes with ``whole`` False and its first ``head`` characters.
    """
    try:
        t = _Text(f)
        if t.skip_space() != "[":
            raise ArraySyntaxError("the top level must be one JSON array")
        t.pos += 1
        count = 0
        if t.skip_space() == "]":
            t.pos += 1
        else:
            while True:
                count += 1
                yield _element(t, limit, head, count)
                c = t.skip_space()
                t.pos += 1
                if c == "]":
                    break
                if c != ",":
                    raise ArraySyntaxError(f"expected ',' or ']' after element {count}, found {c or 'the end'!r}")
                if t.skip_space() == "]":
                    raise ArraySyntaxError(f"a trailing comma after element {count}")
        if t.skip_space():
            raise ArraySyntaxError("unexpected text after the array's end")
    except UnicodeDecodeError as exc:
        raise ArraySyntaxError(f"not UTF-8 text ({exc.reason})") from None


def _element(t: _Text, limit: int, head: int, count: int) -> Element:
    first = t.skip_space()
    if not first:
        raise ArraySyntaxError(f"the array ends early, after element {count - 1}")
    if first == _BOM:  # the decoder would skip it as if it were spacing; JSON has none there
        raise ArraySyntaxError(f"element {count} starts with a byte order mark (U+FEFF)")
    while True:
        start = t.pos
        try:
            _, end = _DECODER.raw_decode(t.buf, start)
        except simplejson.JSONDecodeError as exc:
            if t.eof:
                raise ArraySyntaxError(f"element {count}: {exc.msg}") from None
            # Cut by the end of what was read (or bad text further on): find its end first, then parse it.
            return _scan(t, limit, head, count)
        except RecursionError:  # nested deeper than the decoder goes: the scanner finds its end
            return _scan(t, limit, head, count)
        if len(t.buf) - end < _NUMBER_TAIL and not t.eof:  # a number may go on in the next read
            t.more()
            continue
        t.pos = end
        size = end - start
        if size * 4 > limit:  # a character is 1 to 4 bytes: count exactly only where it can matter
            size = _bytes(t.buf[start:end])
            if size > limit:
                return Element("", size, whole=False, head=t.buf[start:min(end, start + head)])
        return Element(t.buf[start:end], size)


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


_SCALAR_END = re.compile(r"[,\]\s]")


#: A string's body up to its closing quote (or the end of what was read, or a backslash that ends it).
_STRING_BODY = re.compile(r'(?:[^"\\]++|\\.)*+', re.DOTALL)
#: Stretches outside strings at least this long have their brackets counted in bulk (numpy), not one by one.
_BULK = 256


def _next_quote(buf: str, pos: int) -> int:
    q = buf.find('"', pos)
    return len(buf) if q < 0 else q


def _brackets(buf: str, start: int, end: int, depth: int) -> tuple[int, int]:
    """Follow the nesting through ``buf[start:end]`` (no string in it) from ``depth``: (the depth after it, -1),
    or (0, the index just past the bracket that closes the element)."""
    import numpy as np  # only for an over-long element with long stretches of brackets

    codes = np.frombuffer(buf[start:end].encode("utf-32-le"), dtype="<u4")
    steps = (codes == 91).astype(np.int64) + (codes == 123) - (codes == 93) - (codes == 125)  # [ { ] }
    running = np.cumsum(steps)
    closed = np.flatnonzero(running <= -depth)
    if closed.size:
        return 0, start + int(closed[0]) + 1
    return depth + int(running[-1]), -1


def _scan(t: _Text, limit: int, head: int, count: int) -> Element:
    """The element from ``t.pos`` that goes on past what was read: follow strings, escapes and nesting to
    its end, keeping its text only while it is within ``limit`` bytes (then only its first ``head``
    characters), one read at a time; parse it if it was kept whole."""
    pieces: list[str] = []
    first = ""
    size = 0
    depth = 0
    started = in_string = escaped = scalar = over = False
    pos = t.pos
    while True:
        buf = t.buf
        done = False
        while pos < len(buf) and not done:
            if escaped:
                pos, escaped = pos + 1, False
            elif in_string:  # the rest of the string's body in one C-speed match, escapes included
                end = _STRING_BODY.match(buf, pos).end()  # type: ignore[union-attr]
                if end == len(buf):
                    pos = end
                elif buf[end] == "\\":  # the last character read: what it escapes comes with the next read
                    pos, escaped = end + 1, True
                else:
                    pos, in_string = end + 1, False
                    done = depth == 0
            elif scalar:  # a number or literal: up to the next separator
                m = _SCALAR_END.search(buf, pos)
                pos, done = (len(buf), False) if m is None else (m.start(), True)
            elif not started:
                started, c = True, buf[pos]
                pos += 1
                if c == '"':
                    in_string = True
                elif c in "[{":
                    depth = 1
                else:
                    scalar = True
            elif (quote := _next_quote(buf, pos)) - pos >= _BULK:
                # A long stretch without strings (``[],[],...``): its brackets counted in bulk.
                depth, stop = _brackets(buf, pos, quote, depth)
                if stop >= 0:
                    pos, done = stop, True
                else:
                    pos = quote
            else:
                m = _OUTSIDE.search(buf, pos)
                if m is None:
                    pos = len(buf)
                    continue
                c, pos = buf[m.start()], m.end()
                if c == '"':
                    in_string = True
                elif c in "[{":
                    depth += 1
                else:
                    depth -= 1
                    done = depth == 0
        piece = buf[t.pos:pos]
        size += _bytes(piece)
        if len(first) < head:
            first += piece[:head - len(first)]
        if not over:
            pieces.append(piece)
            if size > limit:  # the first characters are all that is kept
                pieces, over = [], True
        t.pos = pos
        if done or (not t.more() and scalar):
            break
        if t.eof and not t.buf:
            raise ArraySyntaxError(f"the array ends inside element {count}")
        pos = 0
    if over:
        return Element("", size, whole=False, head=first)
    text = "".join(pieces)
    try:
        _, end = _DECODER.raw_decode(text)
    except simplejson.JSONDecodeError as exc:
        raise ArraySyntaxError(f"element {count}: {exc.msg}") from None
    except RecursionError:
        # Too deep to check here: validation rejects it as one record (nested deeper than it allows),
        # as it does such an NDJSON line.
        return Element(text, size)
    if end != len(text):
        raise ArraySyntaxError(f"element {count}: unexpected text after the value")
    return Element(text, size)
