"""Read a large JSON object file a piece at a time: chosen top-level arrays are handed over in
batches of elements instead of being built as one Python list.

An LVIS v1 train file is ~1.2 GB of JSON holding ~127 M polygon coordinates; ``json.load`` builds
all of them as Python floats at once (well over 10 GB). :func:`read_json_object` decodes the file
in chunks and parses it with the ``json`` module's own scanner, one top-level value (or, for the
keys in ``streamed``, one array element) at a time, so a consumer can turn each batch of elements
into compact numpy buffers before the next one is parsed.

The result is what ``json.load`` gives, except that the value of a streamed key is its consumer's
``finish()``. Errors are ``json.JSONDecodeError`` with the message, line and column ``json.loads``
reports for the same text (tested against it). Files that are not plain UTF-8 (a byte-order mark,
UTF-16/32, undecodable bytes) or whose top level is not an object go to ``fallback()``, the
caller's whole-file reader, so their errors (or results) are exactly the caller's usual ones.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from typing import Any, Callable, Protocol

__all__ = ["ArrayConsumer", "read_json_object"]

_WS = re.compile(r"[ \t\n\r]*")
_COMMA = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_CHUNK = 8 << 20  # characters decoded per read
_BATCH = 128  # array elements handed over at once (small: they are still in the CPU cache)


class ArrayConsumer(Protocol):
    """Takes an array's elements in batches; ``texts`` (when ``wants_text``) holds each element's
    exact JSON text, else None."""

    wants_text: bool

    def add_batch(self, items: list, texts: list[str] | None) -> None:
        """Take the next elements (in order)."""
        ...

    def finish(self) -> Any:
        """The array's value in the result, once every element was given."""
        ...


class _Fallback(Exception):
    """The file is not plain UTF-8 JSON with an object at the top: use the whole-file reader."""


class _Reader:
    """A window ``buf`` on the decoded text; ``pos`` indexes it, ``base`` is buf[0]'s offset in the text."""

    def __init__(self, fh, errors: str, translate_newlines: bool, chunk: int):
        self.fh, self.chunk, self.errors, self.translate = fh, chunk, errors, translate_newlines
        self.dec = self._decoder()
        self.buf, self.pos, self.base, self.eof = "", 0, 0, False
        self.scan = json.JSONDecoder().scan_once

    def _decoder(self):
        dec = codecs.getincrementaldecoder("utf-8")(self.errors)
        return io.IncrementalNewlineDecoder(dec, translate=True) if self.translate else dec

    def fill(self, more: int = 0) -> None:
        """Drop the consumed text, append at least ``chunk`` (or ``more``) characters unless at EOF."""
        if self.pos:
            self.base += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        want = max(self.chunk, more)
        parts = []
        while want > 0 and not self.eof:
            raw = self.fh.read(want)
            try:
                text = self.dec.decode(raw, final=not raw)
            except UnicodeDecodeError:
                raise _Fallback from None
            self.eof = not raw
            parts.append(text)
            want -= len(text)
        self.buf += "".join(parts)

    def error(self, msg: str, pos: int) -> json.JSONDecodeError:
        """``msg`` at ``pos`` of buf, with json's line / column: the text before it is decoded
        again from the start of the file to count them (errors only)."""
        at = self.base + pos
        try:  # json.loads decodes the whole text before parsing: an undecodable byte anywhere wins
            while not self.eof:
                raw = self.fh.read(self.chunk)
                self.dec.decode(raw, final=not raw)
                self.eof = not raw
        except UnicodeDecodeError:
            raise _Fallback from None
        self.fh.seek(0)
        dec, seen, lines, line_start = self._decoder(), 0, 0, 0
        while seen < at:
            raw = self.fh.read(self.chunk)
            text = dec.decode(raw, final=not raw)[: at - seen]
            n = text.count("\n")
            if n:
                lines += n
                line_start = seen + text.rindex("\n") + 1
            seen += len(text)
            if not raw:
                break
        err = json.JSONDecodeError(msg, "", 0)
        err.msg, err.pos, err.lineno, err.colno = msg, at, lines + 1, at - line_start + 1
        err.args = (f"{msg}: line {err.lineno} column {err.colno} (char {at})",)
        return err

    def peek(self) -> str:
        """Skip whitespace; the next character ('' at the end of the text)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return ""
            self.fill()

    def value(self) -> Any:
        """The JSON value at ``pos`` (after whitespace), read with more text until it is complete;
        afterwards it is ``buf[start:pos]``."""
        self.peek()
        last = None
        grow = 0
        while True:
            try:
                obj, end = self.scan(self.buf, self.pos)
            except StopIteration as e:
                failure = ("Expecting value", e.value)
            except json.JSONDecodeError as e:
                failure = (e.msg, e.pos)
            else:
                if end < len(self.buf) or self.eof:  # a number at the window's end may go on
                    self.start, self.pos = self.pos, end
                    return obj
                failure = None
            if self.eof or (failure is not None and failure == last
                            and not failure[0].startswith("Unterminated string")):
                raise self.error(*(failure or ("Expecting value", self.pos)))
            # The failure may be the window's end cutting the value: read on (doubling, so a
            # long value is rescanned O(log) times) and try again; the same failure twice is real
            # (an unterminated string reports where it starts: it is read on to the end).
            last = failure if failure is None else (failure[0], failure[1] - self.pos)
            grow = max(self.chunk, 2 * grow, len(self.buf))
            self.fill(grow)
            if last is not None:
                last = (last[0], last[1] + self.pos)

    def expect(self, char: str, msg: str) -> None:
        if self.peek() != char:
            raise self.error(msg, self.pos)
        self.pos += 1

    def array(self, consumer: ArrayConsumer, batch_size: int) -> Any:
        """The array at ``pos`` (its ``[`` already checked), handed to ``consumer`` in batches."""
        self.pos += 1
        want_text = bool(getattr(consumer, "wants_text", False))
        items: list = []
        texts: list[str] | None = [] if want_text else None
        scan, comma = self.scan, _COMMA.match
        if self.peek() == "]":
            self.pos += 1
        else:
            while True:
                # fast path: a complete value right at pos, not touching the window's end
                buf, pos = self.buf, self.pos
                try:
                    obj, end = scan(buf, pos)
                except (StopIteration, json.JSONDecodeError):
                    end = len(buf)
                if end < len(buf):
                    self.pos = end
                else:
                    obj = self.value()
                    buf, pos, end = self.buf, self.start, self.pos
                items.append(obj)
                if want_text:
                    texts.append(buf[pos:end])
                if len(items) >= batch_size:
                    consumer.add_batch(items, texts)
                    items, texts = [], ([] if want_text else None)
                m = comma(buf, end)
                if m is not None:  # the common case: ", " (the next value reads on if need be)
                    self.pos = m.end()
                    if self.pos < len(buf):
                        continue
                    self.peek()
                    continue
                c = self.peek()
                if c == ",":
                    self.pos += 1
                elif c == "]":
                    self.pos += 1
                    break
                else:
                    raise self.error("Expecting ',' delimiter", self.pos)
        if items:
            consumer.add_batch(items, texts)
        return consumer.finish()

    def document(self, streamed: dict[str, Callable[[], ArrayConsumer]], batch_size: int) -> dict:
        self.fill()
        if self.buf.startswith("\ufeff") or self.peek() != "{":
            raise _Fallback
        self.pos += 1
        out: dict = {}
        c = self.peek()
        if c == "}":
            self.pos += 1
        else:
            while True:
                if c != '"':
                    raise self.error("Expecting property name enclosed in double quotes", self.pos)
                key = self.value()
                self.expect(":", "Expecting ':' delimiter")
                if key in streamed and self.peek() == "[":
                    out[key] = self.array(streamed[key](), batch_size)
                else:
                    out[key] = self.value()
                c = self.peek()
                if c == "}":
                    self.pos += 1
                    break
                if c != ",":
                    raise self.error("Expecting ',' delimiter", self.pos)
                self.pos += 1
                c = self.peek()
        if self.peek() != "":
            raise self.error("Extra data", self.pos)
        return out


def read_json_object(
    path: str,
    streamed: dict[str, Callable[[], ArrayConsumer]],
    fallback: Callable[[], Any],
    *,
    errors: str = "strict",
    translate_newlines: bool = False,
    chunk: int = _CHUNK,
    batch_size: int = _BATCH,
) -> Any:
    """Parse the JSON object in ``path``; the arrays under the top-level keys of ``streamed`` go,
    ``batch_size`` elements at a time, to a consumer made by ``streamed[key]()`` and are replaced by
    its ``finish()`` (a streamed key whose value is not an array is parsed as usual).

    ``errors`` is the UTF-8 decoder's error handler (``json.loads`` on bytes uses
    ``"surrogatepass"``); ``translate_newlines`` reads ``\\r\\n`` and ``\\r`` as ``\\n``, as a file
    opened in text mode does (the line numbers of errors then match ``json.load`` on it). A file
    that is not plain UTF-8 JSON with an object at the top returns ``fallback()``.
    Raises ``OSError`` from opening / reading and ``json.JSONDecodeError`` for invalid JSON.
    """
    with open(path, "rb") as fh:
        head = fh.read(4)
        if json.detect_encoding(head) != "utf-8":
            return fallback()
        fh.seek(0)
        reader = _Reader(fh, errors, translate_newlines, chunk)
        try:
            return reader.document(streamed, batch_size)
        except _Fallback:
            # not an object at the top (or not plain UTF-8): the whole-file reader gives the
            # value, or exactly its own errors
            return fallback()
