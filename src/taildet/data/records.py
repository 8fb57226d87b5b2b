"""Compact per-item records: Python objects serialized into one numpy byte buffer, and read-only
sequence views that decode an item when it is accessed.

A dataset with a Python object per image and per annotation (LVIS train: ~100 k image dicts, ~1.3 M
annotation dicts holding ~127 M polygon coordinates) costs many GB, and every DataLoader worker
started by ``fork`` copies the pages of those objects as soon as it touches them (reading an object
writes its reference count), so each worker ends up with its own copy. Stored as a few numpy arrays
instead, the data are one allocation each, shared by the workers and never written
(detectron2 does the same with its dataset dicts).

* :class:`RecordStoreBuilder` / :class:`RecordStore`: JSON-like objects (dict, list, str, int,
  float, bool, None) serialized with :mod:`marshal` (exact for these types, and faster than
  pickle; the bytes never leave the process), or the JSON texts as read, in a few large ``uint8``
  chunks plus ``int64`` offsets.
* :class:`RecordView`: ``view[i]`` decodes record ``order[i]`` -- a sequence of dicts.
* :class:`GroupedRecordView`: ``view[i]`` is the list of records of group ``i`` (per image).
* :class:`RaggedArrayView`: ``view[i]`` is a copy of ``flat[offsets[i]:offsets[i + 1]]``.

Views are read-only: an item is a fresh object each time, so changing it changes nothing stored.
"""

from __future__ import annotations

import json
import marshal
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["GroupedRecordView", "RaggedArrayView", "RecordStore", "RecordStoreBuilder", "RecordView",
           "offsets_from_counts"]


def offsets_from_counts(counts: np.ndarray) -> np.ndarray:
    """``int64 [n + 1]``: 0 then the cumulative sum of ``counts``."""
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


_DECODE = {"marshal": marshal.loads, "json": lambda b: json.loads(b.tobytes())}


class RecordStore:
    """``len(store)`` serialized records; ``store.get(k)`` decodes record ``k``.

    The bytes are in a few large chunks (``uint8`` arrays, no record split between two), so that
    building the store never holds two copies; ``codec`` is ``"marshal"`` or ``"json"`` (the
    records are the JSON texts themselves, UTF-8)."""

    def __init__(self, chunks: list[np.ndarray], chunk_of: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 codec: str):
        self.chunks, self.chunk_of, self.starts, self.ends = chunks, chunk_of, starts, ends
        self.codec = codec
        self._decode = _DECODE[codec]

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, k: int) -> Any:
        return self._decode(self.chunks[self.chunk_of[k]][self.starts[k]:self.ends[k]])

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_decode"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._decode = _DECODE[self.codec]

    @property
    def nbytes(self) -> int:
        return int(sum(c.nbytes for c in self.chunks) + self.chunk_of.nbytes + self.starts.nbytes + self.ends.nbytes)

    @classmethod
    def from_objects(cls, objs: list) -> RecordStore:
        b = RecordStoreBuilder()
        b.extend(objs)
        return b.finish()


class RecordStoreBuilder:
    """Collects records into chunks of about ``chunk_bytes``: :meth:`extend` serializes objects
    with marshal, :meth:`extend_texts` stores JSON texts as they are (UTF-8). One builder, one
    codec."""

    def __init__(self, chunk_bytes: int = 64 << 20):
        self.chunk_bytes = chunk_bytes
        self.codec: str | None = None
        self._chunks: list[np.ndarray] = []
        self._cur = bytearray()
        self._sizes: list[np.ndarray] = []
        self._chunk_of: list[np.ndarray] = []

    def _add(self, codec: str, blob: bytes, sizes: np.ndarray) -> None:
        if self.codec not in (None, codec):
            raise ValueError(f"RecordStoreBuilder: {codec} records added to a {self.codec} store")
        self.codec = codec
        self._cur += blob
        self._sizes.append(sizes)
        self._chunk_of.append(np.full(len(sizes), len(self._chunks), dtype=np.int32))
        if len(self._cur) >= self.chunk_bytes:
            self._close_chunk()

    def _close_chunk(self) -> None:
        self._chunks.append(np.frombuffer(self._cur, dtype=np.uint8).copy())
        self._cur = bytearray()

    def extend(self, objs: list) -> None:
        recs = [marshal.dumps(o) for o in objs]
        self._add("marshal", b"".join(recs), np.fromiter(map(len, recs), dtype=np.int64, count=len(recs)))

    def extend_texts(self, texts: list[str]) -> None:
        joined = "".join(texts)
        if joined.isascii():
            sizes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
            self._add("json", joined.encode("ascii"), sizes)
        else:
            recs = [t.encode("utf-8", "surrogatepass") for t in texts]
            self._add("json", b"".join(recs), np.fromiter(map(len, recs), dtype=np.int64, count=len(recs)))

    def finish(self) -> RecordStore:
        if self._cur:
            self._close_chunk()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, dtype=np.int64)
        chunk_of = np.concatenate(self._chunk_of) if self._chunk_of else np.zeros(0, dtype=np.int32)
        ends = np.cumsum(sizes)
        # offsets restart at 0 in each chunk
        first = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]]) if len(sizes) else np.zeros(0, np.int64)
        base = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes):
            base[first] = ends[first] - sizes[first]
            base = np.maximum.accumulate(base)
        ends -= base
        store = RecordStore(self._chunks, chunk_of, ends - sizes, ends, self.codec or "marshal")
        self._chunks, self._sizes, self._chunk_of = [], [], []
        return store


class _View(Sequence):
    """Common indexing: ints (negative ones too) and slices (a list)."""

    _what = "items"

    @abstractmethod
    def _item(self, i: int) -> Any:
        """Item ``i`` (``0 <= i < len(self)``), decoded."""

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(n))]
        i = int(i)  # numpy / torch integers too
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} {self._what}")
        return self._item(i % n)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {len(self)} {self._what}, decoded on access>"


class RecordView(_View):
    """``view[i]`` = ``store.get(order[i])`` (``order`` default: all records in order)."""

    _what = "records"

    def __init__(self, store: RecordStore, order: np.ndarray | None = None):
        self.store, self.order = store, order

    def __len__(self) -> int:
        return len(self.store) if self.order is None else len(self.order)

    def _item(self, i: int) -> Any:
        return self.store.get(i if self.order is None else int(self.order[i]))


class GroupedRecordView(_View):
    """``view[i]`` = ``[store.get(k) for k in order[offsets[i]:offsets[i + 1]]]``."""

    _what = "groups"

    def __init__(self, store: RecordStore, order: np.ndarray, offsets: np.ndarray):
        self.store, self.order, self.offsets = store, order, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _item(self, i: int) -> list:
        get = self.store.get
        return [get(k) for k in self.order[self.offsets[i]:self.offsets[i + 1]].tolist()]


class RaggedArrayView(_View):
    """``view[i]`` = a copy of ``flat[offsets[i]:offsets[i + 1]]``."""

    _what = "arrays"

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _item(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]].copy()
