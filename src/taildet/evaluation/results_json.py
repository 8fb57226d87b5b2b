"""Reading a results JSON list in pieces, without a Python object per detection.

Two readers, both exact (the values are the ones ``json.load`` gives):

* :func:`read_flat_bbox` -- the common case of a bbox results file whose records are all written
  alike (``{"image_id": 1, "category_id": 2, "bbox": [x, y, w, h], "score": s}``, any key order,
  any spacing, the same for every record). It checks every byte of the layout and every number
  against JSON's number grammar with numpy and converts the numbers with ``np.fromstring`` (the
  correctly rounded conversion ``float()`` does), a piece of the file at a time. It returns
  ``None`` as soon as the file is anything else (another layout, a key more or less, an id
  written ``1.0``, an escape), and the caller falls back to the general reader.
* :func:`iter_json_list` -- any JSON list, a piece of the file at a time (UTF-8): the elements of
  most of a piece with one ``json.loads``, those around the piece's ends one at a time with
  ``json.JSONDecoder.raw_decode``. It raises :class:`NotStreamable` on anything it cannot read (a
  syntax error, no top-level list, bad UTF-8); the caller then reads the file with ``json.load``
  to give the usual error message.
"""

from __future__ import annotations

import codecs
import json
import re
import warnings
from typing import IO, Iterator

import numpy as np

__all__ = ["CHUNK_BYTES", "NotStreamable", "iter_json_list", "read_flat_bbox"]

#: Bytes read from the file at a time.
CHUNK_BYTES = 32 << 20

_WS = b" \t\n\r"
_BBOX_KEYS = {b"image_id", b"category_id", b"bbox", b"score"}


class NotStreamable(Exception):
    """The piecewise reader cannot read this file; read it whole to get the error message."""


# ------------------------------------------------------------------------------ flat bbox records
_NUMCHARS = b"0123456789.-+eE"
_IS_NUM = bytes(1 if b in _NUMCHARS else 0 for b in range(256))  # translate table: number byte -> 1
_TO_SPACE = bytes(b if b in _NUMCHARS else 32 for b in range(256))  # everything but numbers -> ' '
_KEY_E = {b"image_id": 1, b"category_id": 1, b"score": 1, b"bbox": 0}  # 'e's (after a letter) per key


def _runs(piece: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """Starts and ends of the runs of number bytes (``0-9 . - + e E``) of ``piece``; None when a run
    touches either end."""
    m = np.frombuffer(piece.translate(_IS_NUM), np.uint8)
    if m[0] or m[-1]:
        return None
    edges = np.flatnonzero(m[1:] != m[:-1]) + 1
    return edges[0::2], edges[1::2]


class _Layout:
    """The first record's layout: its bytes without the number bytes (the keys' 'e's are runs
    too), the separator between records, where each run sits and which field each number is."""

    def __init__(self, piece: bytes):
        i0, e0 = piece.find(b"{"), piece.find(b"}") + 1
        i1 = piece.find(b"{", e0)
        if i0 < 0 or e0 <= 0 or i1 < 0:
            raise NotStreamable("fewer than two records")
        rec = piece[i0:e0]
        keys = re.findall(rb'"([^"\\]*)"', rec)
        if len(keys) != 4 or set(keys) != _BBOX_KEYS:
            raise NotStreamable("not the four bbox keys")
        runs = _runs(rec)
        self.record = rec.translate(None, _NUMCHARS)
        canonical = b"{" + b",".join(b'"' + k + b'":' + (b"[,,,]" if k == b"bbox" else b"") for k in keys) + b"}"
        if runs is None or len(runs[0]) != 10 or self.record.translate(None, _WS) != canonical.translate(None, b"e"):
            raise NotStreamable("not a flat record")
        self.sep, self.lead = piece[e0:i1], piece[:i0]
        if self.sep.translate(None, _WS) != b"," or self.lead.translate(None, _WS) != b"[":
            raise NotStreamable("not a list of records")
        lengths = runs[1] - runs[0]
        self.offsets = runs[0] - (np.cumsum(lengths) - lengths)  # where each run sits in self.record
        kinds = []  # per run: a field name, or "e" for a key's letter
        for k in keys:
            kinds += ["e"] * _KEY_E[k] + (["x", "y", "w", "h"] if k == b"bbox" else [k.decode()])
        if [rec[s:e] for s, e, k in zip(*runs, kinds) if k == "e"] != [b"e"] * 3:
            raise NotStreamable("not a flat record")
        self.key_e = np.array([k == "e" for k in kinds])
        self.slot = {k: i for i, k in enumerate(k for k in kinds if k != "e")}  # among the 7 numbers


def _flat_piece(piece: bytes, lay: _Layout, prefix: bytes) -> dict[str, np.ndarray] | None:
    """Columns of a piece ``prefix record (sep record)*`` of the file, or None when it is not that.

    Exactness: the bytes outside the number runs must be the layout's, every run where the layout
    has a number, a key's 'e' where it has one. ``np.fromstring`` then reads each number run as one
    number to its end (else it fails), which leaves four ways a run can be a number to strtod but
    not to JSON -- a '+' not after the exponent's 'e', a '.' without digits on both sides, a leading
    zero, and an id with a fraction or exponent -- all checked here.
    """
    if b"\\" in piece:
        return None
    runs = _runs(piece)
    if runs is None:
        return None
    starts, ends = runs
    n = len(starts) // 10
    if n < 1 or len(starts) != 10 * n:
        return None
    if piece.translate(None, _NUMCHARS) != prefix + (lay.record + lay.sep) * (n - 1) + lay.record:
        return None
    lengths = ends - starts
    expected = (np.arange(n)[:, None] * (len(lay.record) + len(lay.sep)) + lay.offsets[None, :]).ravel()
    if not np.array_equal(starts - (np.cumsum(lengths) - lengths), expected + len(prefix)):
        return None
    a = np.frombuffer(piece, np.uint8)
    key_e = np.tile(lay.key_e, n)
    e_at = starts[key_e]
    if (lengths[key_e] != 1).any() or (a[e_at] != ord("e")).any():
        return None
    starts, ends = starts[~key_e].reshape(n, 7), ends[~key_e].reshape(n, 7)
    # JSON's number grammar, beyond what strtod checks
    plus = np.flatnonzero(a == ord("+"))
    if len(plus) and not np.isin(a[plus - 1], _EXP).all():
        return None
    dots = np.flatnonzero(a == ord("."))
    if ((a[dots - 1] - 48 > 9) | (a[dots + 1] - 48 > 9)).any():  # uint8: wraps below '0'
        return None
    ip = starts + (a[starts] == ord("-"))
    if ((a[ip] == ord("0")) & (a[ip + 1] - 48 <= 9)).any():
        return None
    text = bytearray(piece.translate(_TO_SPACE))
    np.frombuffer(text, np.uint8)[e_at] = 32
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vals = np.fromstring(bytes(text), dtype=np.float64, sep=" ")
    except (ValueError, Warning):
        return None
    if len(vals) != 7 * n:
        return None
    vals = vals.reshape(n, 7)
    frac = np.flatnonzero(np.frombuffer(piece.translate(_FRAC), np.uint8))  # '.', 'e', 'E'

    def is_int(s: np.ndarray, e: np.ndarray) -> np.ndarray:  # no '.' and no exponent in [s, e)
        return frac[np.minimum(np.searchsorted(frac, s), len(frac) - 1)] >= e

    zero = np.flatnonzero((vals == 0) & np.signbit(vals))  # "-0" is the integer 0 to JSON, "-0.0" is -0.0
    if len(zero):
        r, j = np.divmod(zero, 7)
        vals[r[is_int(starts[r, j], ends[r, j])], j[is_int(starts[r, j], ends[r, j])]] = 0.0
    out = {}
    for key in ("image_id", "category_id"):
        j = lay.slot[key]
        s, e = starts[:, j], ends[:, j]
        # an integer (no '.', no exponent) of at most 15 digits, exact in float64
        if (e - s).max() > 15 or not is_int(s, e).all():
            return None
        out[key] = vals[:, j].astype(np.int64)
    out["score"] = np.ascontiguousarray(vals[:, lay.slot["score"]])
    out["bbox"] = np.ascontiguousarray(vals[:, [lay.slot[k] for k in "xywh"]])
    return out


_EXP = np.frombuffer(b"eE", np.uint8)
_FRAC = bytes(1 if b in b".eE" else 0 for b in range(256))  # translate table: '.', 'e', 'E' -> 1


def read_flat_bbox(f: IO[bytes], chunk_bytes: int = CHUNK_BYTES) -> dict[str, np.ndarray] | None:
    """``image_id``, ``category_id`` (int64), ``score`` (float64) and ``bbox`` (float64 [N, 4])
    of a binary results file of flat bbox records all written alike, else None."""
    lay = None
    carry = b""
    parts = []
    while True:
        data = f.read(chunk_bytes)
        if not data:
            break
        buf = carry + data
        cut = buf.rfind(b"}") + 1
        if cut == 0:
            carry = buf
            continue
        piece, carry = buf[:cut], buf[cut:]
        if lay is None:
            if piece.count(b"}") < 2:  # the layout needs two records
                carry = buf
                continue
            try:
                lay = _Layout(piece)
            except NotStreamable:
                return None
            prefix = lay.lead
        else:
            prefix = lay.sep
        cols = _flat_piece(piece, lay, prefix)
        if cols is None:
            return None
        parts.append(cols)
    if lay is None or carry.translate(None, _WS) != b"]":
        return None
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ------------------------------------------------------------------------------ any JSON list
_WS_RE = re.compile(r"[ \t\n\r]*")
_BOUNDARY = re.compile(r"\}[ \t\n\r]*,[ \t\n\r]*\{")


def _bulk(text: str, pos: int) -> tuple[list, int] | None:
    """The elements from ``pos`` (an element's start) to the last ``}, {`` of ``text`` in one
    ``json.loads``, and where the next element starts; None when there is no such boundary or
    the text up to it does not parse (a ``}, {`` inside an element or a string: a proper prefix of
    a JSON value never parses, so a text that parses ends where an element ends)."""
    end = len(text)
    for _ in range(64):
        end = text.rfind("}", pos, end)
        if end < 0:
            return None
        m = _BOUNDARY.match(text, end)
        if m:
            break
    else:
        return None
    try:
        return json.loads("[" + text[pos:end + 1] + "]"), m.end() - 1
    except json.JSONDecodeError:
        return None


def iter_json_list(f: IO[bytes], batch: int = 50_000,
                   chunk_bytes: int = CHUNK_BYTES) -> Iterator[list]:
    """The elements of the JSON list in the binary file ``f``, in lists of up to ``batch``."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    scan = json.JSONDecoder().raw_decode
    text, pos, eof = "", 0, False

    def more() -> None:
        nonlocal text, pos, eof
        data = f.read(chunk_bytes)
        try:
            new = decoder.decode(data, final=not data)
        except UnicodeDecodeError:
            raise NotStreamable("not UTF-8") from None
        eof = not data
        text, pos = text[pos:] + new, 0

    def skip_ws() -> None:
        nonlocal pos
        while True:
            pos = _WS_RE.match(text, pos).end()
            if pos < len(text) or eof:
                return
            more()

    skip_ws()
    if text[pos:pos + 1] != "[":
        raise NotStreamable("no list")
    pos += 1
    out: list = []
    skip_ws()
    if text[pos:pos + 1] == "]":
        pos += 1
    else:
        while True:
            bulk = _bulk(text, pos)
            if bulk is not None:  # most of the piece at once: json.loads is faster than raw_decode
                out += bulk[0]
                pos = bulk[1]
                while len(out) >= batch:
                    yield out[:batch]
                    out = out[batch:]
                continue
            while True:
                try:
                    obj, end = scan(text, pos)
                except json.JSONDecodeError:
                    if eof:
                        raise NotStreamable("syntax") from None
                    more()
                    continue
                if end == len(text) and not eof:  # a number may go on in the next piece
                    more()
                    continue
                break
            pos = end
            out.append(obj)
            if len(out) >= batch:
                yield out
                out = []
            skip_ws()
            ch = text[pos:pos + 1]
            pos += 1
            if ch == "]":
                break
            if ch != ",":
                raise NotStreamable("syntax")
            skip_ws()
    skip_ws()
    if pos != len(text) or not eof:
        raise NotStreamable("extra data")
    if out:
        yield out
