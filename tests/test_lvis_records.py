"""Issue 13: the LVIS reader keeps its records compact (streamed JSON, numpy buffers) and gives
exactly what the whole-file, dict-per-annotation reader gave (``lvis_reference``, a frozen copy):
every public attribute, every ``get_target`` (masks too), every error message, skip count and
warning -- on the real 100-image LVIS sample, the embedded synthetic dataset, a generated LVIS-like
set and randomly broken variants of it; ``dataset_stats`` likewise. The streaming JSON reader
reports the errors ``json.loads`` reports. A DataLoader worker's private memory does not grow
over an epoch."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import warnings

import numpy as np
import pytest
import torch

from helpers import LVIS_VAL_100
from lvis_reference import dataset_stats as reference_stats
from lvis_reference import reference_load
from taildet.data.json_stream import read_json_object
from taildet.data.lvis import load_lvis
from taildet.data.stats import dataset_stats
from taildet.errors import DataError

PUBLIC = ("num_classes", "categories", "cat_ids", "cat_id_to_label", "class_names", "frequency_groups",
          "num_images", "image_ids", "num_annotations", "skipped", "skipped_examples", "clipped_boxes")
ARRAYS = ("image_counts", "instance_counts", "image_frequency")


def _bits(v):
    if isinstance(v, torch.Tensor):
        return (str(v.dtype), tuple(v.shape), v.contiguous().numpy().tobytes())
    if isinstance(v, np.ndarray):
        return (str(v.dtype), v.shape, v.tobytes())
    return (type(v).__name__, repr(v))


def _outcome(fn):
    """("ok", result, warning messages) or ("error", exception type, message)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            out = fn()
        except (DataError, ValueError, TypeError, KeyError, OverflowError) as e:
            return ("error", type(e).__name__, str(e))
    return ("ok", out, [str(w.message) for w in rec if issubclass(w.category, UserWarning)])


def assert_same_dataset(new, ref):
    for name in PUBLIC:
        assert repr(getattr(new, name)) == repr(getattr(ref, name)), name
    for name in ARRAYS:
        assert _bits(getattr(new, name)) == _bits(getattr(ref, name)), name
    assert len(new.images) == len(ref.images) and repr(list(new.images)) == repr(ref.images)
    assert len(new.labels_per_image) == len(ref.labels_per_image)
    assert [_bits(a) for a in new.labels_per_image] == [_bits(a) for a in ref.labels_per_image]
    assert len(new.annotations_per_image) == len(ref.annotations_per_image)
    assert repr(list(new.annotations_per_image)) == repr(ref.annotations_per_image)
    for i in range(ref.num_images):
        a, b = new.get_target(i), ref.get_target(i)
        assert a.keys() == b.keys()
        assert {k: _bits(v) for k, v in a.items()} == {k: _bits(v) for k, v in b.items()}, i


def assert_same_load(path, **kw):
    new = _outcome(lambda: load_lvis(path, **kw))
    ref = _outcome(lambda: reference_load(path, **kw))
    assert new[0] == ref[0], (new, ref)
    if new[0] == "error":
        assert new[1:] == ref[1:]
    else:
        assert new[2] == ref[2]  # the skip warning
        assert_same_dataset(new[1], ref[1])
    return new


def assert_same_stats(path):
    new, ref = _outcome(lambda: dataset_stats(path)), _outcome(lambda: reference_stats(path))
    assert new == ref


# ------------------------------------------------------------------ data


def generated(seed: int = 0, n_images: int = 30, n_cats: int = 12, edgy: bool = False) -> dict:
    """An LVIS-like file with the awkward parts of real ones: unsorted ids, boxes sticking out by
    up to 1 px (clipped), -0.0 and integer coordinates, multi-part polygons, crowd RLEs
    (compressed and not), missing areas, iscrowd given as true / 1.0, categories with and
    without frequency / image_count, images with file_name or coco_url only. ``edgy``: also boxes
    and polygons at and just beyond the image border's tolerance (kept or skipped)."""
    rng = random.Random(seed)
    cats = []
    for c in rng.sample(range(1, 500), n_cats):
        cat = {"id": c, "name": f"cat{c}", "synonyms": [f"cat{c}"]}
        r = rng.random()
        if r < 0.4:
            cat["frequency"] = rng.choice("rcf")
        elif r < 0.7:
            cat["image_count"] = rng.randint(0, 300)
        cats.append(cat)
    images = []
    for i in rng.sample(range(1, 10_000), n_images):
        w, h = rng.choice([(64, 48), (48, 64), (40, 40), (33, 21)])
        im = {"id": i, "width": w if rng.random() < 0.8 else float(w), "height": h,
              "neg_category_ids": rng.sample([c["id"] for c in cats], 2), "not_exhaustive_category_ids": []}
        if rng.random() < 0.5:
            im["file_name"] = f"{i:06d}.jpg"
        else:
            im["coco_url"] = f"http://images.cocodataset.org/train2017/{i:012d}.jpg"
        images.append(im)
    anns = []
    ann_ids = rng.sample(range(1, 100_000), n_images * 4)
    for aid in ann_ids:
        im = rng.choice(images)
        W, H = int(im["width"]), im["height"]
        bw, bh = rng.uniform(1, W / 2), rng.uniform(1, H / 2)
        x, y = rng.uniform(-1, W - bw + 1), rng.uniform(-1, H - bh + 1)
        x, y, bw, bh = (round(v, 2) for v in (x, y, bw, bh))
        if rng.random() < 0.1:
            x, y, bw, bh = (int(v) for v in (max(x, 0), max(y, 0), max(bw, 1), max(bh, 1)))
        if rng.random() < 0.05:
            x = -0.0
        if edgy and rng.random() < 0.15:  # at and just beyond the 1 px tolerance
            x, y = rng.choice([(-1.0, y), (-1.0000001, y), (-1.5, y), (x, H - bh + 1), (x, H - bh + 1.01),
                               (W - bw + 1.0, y), (W - bw + 1.5, y), (W + 0.5, y), (W + 1.0, y)])
        a = {"id": aid, "image_id": im["id"], "category_id": rng.choice(cats)["id"], "bbox": [x, y, bw, bh]}
        r = rng.random()
        if r < 0.08:  # crowd: RLE of the box
            counts = [min(max(int(y), 0), H - 1) * W, 1, W * H - min(max(int(y), 0), H - 1) * W - 1]
            a["segmentation"] = {"size": [H, W], "counts": counts}
            a["iscrowd"] = rng.choice([1, True, 1.0])
        else:
            parts = []
            for _ in range(rng.choice([1, 1, 2])):
                n = rng.randint(3, 12)
                poly = []
                for k in range(n):
                    t = 2 * math.pi * k / n
                    poly += [round(x + bw / 2 * (1 + math.cos(t)), 2), round(y + bh / 2 * (1 + math.sin(t)), 2)]
                parts.append([max(v, 0.0) for v in poly])
            if edgy and rng.random() < 0.15:  # a polygon at / beyond the 1 px border its check allows
                parts[-1][rng.randrange(len(parts[-1]))] = rng.choice([-1, -1.0001, -2.5, W + 1, H + 1, W + 1.01,
                                                                      H + 1.5, W + 2])

            a["segmentation"] = parts
            if rng.random() < 0.5:
                a["iscrowd"] = rng.choice([0, False, 0.0])
        if rng.random() < 0.8:
            a["area"] = round(bw * bh * 0.8, 2) if rng.random() < 0.9 else int(bw * bh)
        a["extra"] = {"nested": [1, 2.5, None, "é"]} if rng.random() < 0.05 else None
        anns.append(a)
    return {"info": {"x": 1}, "categories": cats, "images": images, "annotations": anns}


WEIRD = [None, "x", True, False, 1.5, -1, 0, 2**60, 2**80, float("nan"), float("inf"), [], {}, [1, 2, 3],
         [1, 2, "3", 4], [1, 2, 0, 4], [0, 0, 1e308, 1], [-0.5, -0.5, 2, 2], [1.0, 2.0, 3.0, 4.0]]
FIELDS = ["id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"]
SEGS = [[], [[1, 2, 3]], [[1, 2, 3, 4, 5]], [[0, 0, 5, 0, 5, float("nan")]], [[0, 0, 500, 0, 5, 5]],
        [[0, 0, 5, 0, True, 5]], [["0", 0, 5, 0, 5, 5]], {"counts": "abc"}, {"size": [1, 1], "counts": [1]},
        {"size": [48, 64], "counts": "0"}, 5, [[0, 0, 5, 0, 5, 5], 7]]


def mutated(seed: int) -> dict:
    """:func:`generated` with a few annotations broken in random ways (and sometimes a duplicate
    id, a non-object annotation or an unknown image)."""
    rng = random.Random(1000 + seed)
    data = generated(seed % 5, n_images=8, edgy=seed % 3 == 0)
    anns = data["annotations"]
    for _ in range(rng.randint(1, 3)):
        a = rng.choice(anns)
        r = rng.random()
        if r < 0.1:
            anns[anns.index(a)] = rng.choice([5, "a", [1], None])
        elif r < 0.2:
            a["id"] = rng.choice(anns)["id"] if isinstance(rng.choice(anns), dict) else 1
        elif r < 0.3:
            a.pop(rng.choice(FIELDS), None)
        elif r < 0.45:
            a["segmentation"] = copy.deepcopy(rng.choice(SEGS))
        elif r < 0.55:
            a["image_id"] = rng.choice(data["images"])["id"]  # its box may now stick out
        else:
            a[rng.choice(FIELDS)] = copy.deepcopy(rng.choice(WEIRD))
    return data


def write(tmp_path, data, name="ann.json", **dump) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(data, **dump), encoding="utf-8")
    return str(p)


# ------------------------------------------------------------------ identity


@pytest.mark.parametrize("with_masks", [False, True])
def test_real_lvis_sample_identical(with_masks):
    assert_same_load(str(LVIS_VAL_100), with_masks=with_masks)
    assert_same_stats(str(LVIS_VAL_100))


@pytest.fixture(scope="module")
def synthetic_json(tmp_path_factory):
    from taildet.data.synthetic import make_dataset

    info = make_dataset(tmp_path_factory.mktemp("synth"), seed=3, scale=0.05, progress=False, num_workers=1)
    return info["train_json"], info["val_json"]


@pytest.mark.parametrize("with_masks", [False, True])
def test_embedded_synthetic_dataset_identical(synthetic_json, with_masks):
    for path in synthetic_json:
        assert_same_load(path, with_masks=with_masks)
        assert_same_stats(path)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_masks", [False, True])
def test_generated_set_identical(tmp_path, seed, with_masks):
    data = generated(seed)
    path = write(tmp_path, data, indent=1 if seed % 2 else None)
    out = assert_same_load(path, with_masks=with_masks)
    assert out[0] == "ok" and out[1].num_annotations > 50 and out[1].clipped_boxes > 0
    assert_same_stats(path)
    # the records stay records: no Python object per annotation in the dataset
    ds = out[1]
    assert not isinstance(ds.annotations_per_image, list) and not isinstance(ds.images, list)
    path = write(tmp_path, generated(seed, edgy=True), name="edgy.json")
    out = assert_same_load(path, with_masks=with_masks, skip_invalid=True)
    assert out[0] == "ok" and "box outside image" in out[1].skipped
    assert not with_masks or "bad segmentation" in out[1].skipped


@pytest.mark.parametrize("seed", range(40))
def test_broken_variants_identical(tmp_path, seed):
    path = write(tmp_path, mutated(seed))
    for with_masks in (False, True):
        for skip_invalid in (False, True):
            assert_same_load(path, with_masks=with_masks, skip_invalid=skip_invalid)
    assert_same_stats(path)


def test_dataset_from_dict_identical(tmp_path):
    """LVISDataset built from an in-memory dict (no streaming): the same, objects serialized."""
    from taildet.data.lvis import LVISDataset

    data = generated(7)
    path = write(tmp_path, data)
    for with_masks in (False, True):
        new = LVISDataset(path, str(tmp_path), copy.deepcopy(data), with_masks=with_masks)
        assert_same_dataset(new, reference_load(path, with_masks=with_masks))
    assert _outcome(lambda: dataset_stats(copy.deepcopy(data))) == _outcome(lambda: reference_stats(data))
    for seed in range(10):
        broken = mutated(seed)
        assert _outcome(lambda b=broken: dataset_stats(copy.deepcopy(b))) == _outcome(lambda b=broken: reference_stats(b))


def test_dataset_pickles(tmp_path):
    """A spawn-started worker gets the dataset pickled: the records travel as they are."""
    import pickle

    path = write(tmp_path, generated(3))
    ds = load_lvis(path, with_masks=True)
    assert_same_dataset(pickle.loads(pickle.dumps(ds)), reference_load(path, with_masks=True))


def test_views_are_read_only_sequences(tmp_path):
    ds = load_lvis(write(tmp_path, generated(1)))
    k = next(i for i, a in enumerate(ds.annotations_per_image) if a)
    ds.annotations_per_image[k][0]["bbox"] = "changed"
    ds.images[k]["id"] = -5
    ds.labels_per_image[k][:] = 99
    assert ds.annotations_per_image[k][0]["bbox"] != "changed" and ds.images[k]["id"] != -5
    assert 99 not in ds.labels_per_image[k]
    assert ds.images[-1] == ds.images[len(ds) - 1] and len(ds.images[1:4]) == 3
    with pytest.raises(IndexError):
        ds.images[len(ds)]
    with pytest.raises(IndexError):
        ds.get_target(len(ds))


# ------------------------------------------------------------------ the streaming JSON reader


class _ListConsumer:
    wants_text = True

    def __init__(self):
        self.items, self.texts = [], []

    def add_batch(self, items, texts):
        assert len(texts) == len(items)
        self.items += items
        self.texts += texts

    def finish(self):
        assert repr([json.loads(t) for t in self.texts]) == repr(self.items)  # each element's own text
        return self.items


def _stream(path, chunk, translate=False, errors="surrogatepass"):
    def whole():
        with open(path, "rb") as f:
            return json.loads(f.read())
    return read_json_object(path, {"annotations": _ListConsumer}, whole, chunk=chunk, batch_size=3,
                            errors=errors, translate_newlines=translate)


def _json_outcome(fn):
    try:
        return ("ok", repr(fn()))
    except json.JSONDecodeError as e:
        return ("error", e.msg, e.lineno, e.colno, e.pos)


def test_stream_reader_matches_json_loads_on_broken_text(tmp_path):
    base = json.dumps({"a": 1, "annotations": [{"id": i, "v": [1.5, -2, "s\\u00e9\n"], "n": None} for i in range(6)],
                       "b": [True, 1e5], "c": {"d": "x"}}, indent=1)
    rng = random.Random(0)
    p = tmp_path / "t.json"
    cases = [base, base + " x", base[:-1], "", "   ", "{}", '{"annotations": []}', '{"annotations": [1,]}',
             '{"annotations": [1 2]}', '{"annotations": {"x": 1}}', '{"a": 1,}', '{"a" 1}', '{"a": 1 "b": 2}',
             '{"annotations": [1, 2], "annotations": [3]}', '{"annotations": [12345678901234567890123]}',
             '[1, 2]', '\ufeff{"a": 1}', '{"annotations": ["unterminated]}', '{"annotations": [tru]}']
    for _ in range(150):
        s = list(base)
        for _ in range(rng.randint(1, 3)):
            k = rng.randrange(len(s))
            op = rng.random()
            if op < 0.4:
                del s[k]
            elif op < 0.8:
                s.insert(k, rng.choice(',:[]{}"x 1\n\\-.e'))
            else:
                s = s[:k]
        cases.append("".join(s))
    for text in cases:
        p.write_bytes(text.encode("utf-8"))
        want = _json_outcome(lambda: json.loads(p.read_bytes()))
        for chunk in (1, 7, 64, 1 << 20):
            assert _json_outcome(lambda c=chunk: _stream(str(p), c)) == want, (text, chunk)


def test_stream_reader_text_mode_newlines_and_encodings(tmp_path):
    p = tmp_path / "t.json"
    text = '{"a": 1,\r\n "annotations": [1,\r 2,\r\n 3 x]}'
    p.write_bytes(text.encode())
    with open(p, encoding="utf-8") as f:
        with pytest.raises(json.JSONDecodeError) as want:
            json.load(f)
    for chunk in (1, 5, 100):
        with pytest.raises(json.JSONDecodeError) as got:
            _stream(str(p), chunk, translate=True, errors="strict")
        assert (got.value.msg, got.value.lineno, got.value.colno, got.value.pos) == (
            want.value.msg, want.value.lineno, want.value.colno, want.value.pos)
    # not UTF-8 (UTF-16, a bad byte even after a syntax error): the whole-file reader decides
    for raw in ('{"annotations": [1]}'.encode("utf-16"), b'{"annotations": [1 2, "\xff"]}', b'{"a": "\xff"'):
        p.write_bytes(raw)

        def outcome(fn):
            try:
                return repr(fn())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return f"{type(e).__name__}: {e}"
        assert outcome(lambda: _stream(str(p), 4)) == outcome(lambda r=raw: json.loads(r))


def test_invalid_json_errors_identical(tmp_path):
    """load_lvis / data stats on broken JSON: the old messages (line and column included)."""
    text = json.dumps(generated(2, n_images=4), indent=1)
    rng = random.Random(5)
    for n in range(30):
        k = rng.randrange(len(text))
        broken = text[:k] + rng.choice(["", ",", "]", "x", '"']) + text[k + 1:]
        p = tmp_path / f"b{n}.json"
        p.write_text(broken)
        assert_same_load(str(p))
        assert_same_stats(str(p))
    for raw in (b"\xff\xfe{", '{"a": "é"}'.encode("utf-16"), b"", b'\xef\xbb\xbf{"images": []}', b'{"a": "\xff"}'):
        p = tmp_path / "enc.json"
        p.write_bytes(raw)
        assert_same_load(str(p))
        assert_same_stats(str(p))


# ------------------------------------------------------------------ worker memory


def _uss(pid: int) -> int:
    out = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                out += int(line.split()[1]) * 1024
    return out


class _Targets(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        t = self.ds.get_target(i)
        return int(t["boxes"].shape[0])


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc smaps_rollup")
def test_worker_private_memory_does_not_grow_over_an_epoch(tmp_path):
    """Reading the records in a forked DataLoader worker copies no dataset pages: the worker's
    private memory after a whole epoch is about what it was after the first batch (here +3-4 MB,
    torch's own allocations; the old dict-per-annotation reader: +49 MB, the pages of the
    annotation dicts copied as their reference counts were written)."""
    rng = np.random.default_rng(0)
    n_img, per = 6000, 4
    images = [{"id": i + 1, "width": 64, "height": 48, "file_name": f"{i}.jpg"} for i in range(n_img)]
    poly = np.round(rng.uniform(1, 40, size=(n_img * per, 40)), 2).tolist()
    anns = [{"id": k + 1, "image_id": k // per + 1, "category_id": 1 + k % 7, "bbox": [1.0, 2.0, 20.5, 30.25],
             "area": 300.5, "segmentation": [poly[k]], "iscrowd": 0} for k in range(n_img * per)]
    path = write(tmp_path, {"images": images, "annotations": anns,
                            "categories": [{"id": c, "name": str(c)} for c in range(1, 8)]})
    del images, anns, poly
    ds = load_lvis(path)
    ctx = torch.multiprocessing.get_context("fork")
    loader = torch.utils.data.DataLoader(_Targets(ds), batch_size=64, num_workers=1, persistent_workers=True,
                                         multiprocessing_context=ctx, collate_fn=list)
    it = iter(loader)
    n = len(next(it))
    pid = it._workers[0].pid
    start = _uss(pid)
    for batch in it:
        n += len(batch)
    end = _uss(pid)
    del it, loader
    assert n == n_img
    assert end - start < 16 * 2**20, f"worker private memory grew {(end - start) / 2**20:.1f} MB over the epoch"
