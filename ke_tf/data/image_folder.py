"""Image folders in Knowledge Evolution's Flower102 layout.

    data_dir/jpg/<files>
    data_dir/lists/trn.csv, val.csv, tst.csv   (header: file_name,label)

`file_name` is relative to jpg/. Labels (ints or strings) are remapped to
0..K-1 by sorting the unique labels of trn.csv (ints numerically). Every
listed file is validated once at load time (exists, has an image signature,
decodes), so a bad file is reported by name and csv line instead of failing
deep inside a training epoch. With on_bad_file="skip" bad rows are dropped
and counted in a warning.
"""

from __future__ import annotations

import csv
import os
import warnings

import numpy as np
import tensorflow as tf

from ke_tf.data.source import Source
from ke_tf.data.tfds_sources import IMAGENET_MEAN, IMAGENET_STD
from ke_tf.data.transforms import ResizedCropTransform
from ke_tf.io.progress import progress_bar

COLUMNS = ("file_name", "label")
TEST_SPLITS = ("tst", "val")
DEFAULT_SIZE = 224
PROGRESS_THRESHOLD = 500
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


class _Rows:
    """Collects bad rows: raises in "fail" mode, counts in "skip" mode."""

    def __init__(self, csv_path: str, on_bad_file: str):
        self.csv_path, self.on_bad_file, self.bad = csv_path, on_bad_file, []

    def reject(self, line: int, reason: str):
        msg = f"{reason} (line {line} of {self.csv_path})"
        if self.on_bad_file == "fail":
            raise ValueError(msg)
        self.bad.append(msg)

    def report(self):
        if self.bad:
            warnings.warn(f"skipped {len(self.bad)} bad rows in {self.csv_path}; first: {self.bad[0]}", stacklevel=3)


def _read_csv(path: str, rows: _Rows) -> list[tuple[int, str, str]]:
    """(line number, file_name, raw label) for each well-formed row."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image_folder: missing list file {path}")
    out = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"image_folder: {path} lacks column(s) {missing}; "
                f"header is {reader.fieldnames}, expected {list(COLUMNS)}"
            )
        for row in reader:
            line = reader.line_num
            empty = [c for c in COLUMNS if not (row.get(c) or "").strip()]
            if empty:
                rows.reject(line, f"missing field(s) {empty}")
                continue
            out.append((line, row["file_name"].strip(), row["label"].strip()))
    return out


def _label_key(raw: str, numeric: bool):
    return int(raw) if numeric else raw


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _valid_image(path: str) -> bool:
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_MAGIC):
        return False
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        return False
    return True


def _progress(items, desc: str):
    if len(items) <= PROGRESS_THRESHOLD:
        yield from items
        return
    with progress_bar(total=len(items), desc=desc, unit="img") as bar:
        for item in items:
            yield item
            bar.update(1)


def _build(entries, mapping, numeric, jpg_dir, rows: _Rows) -> Source:
    paths, labels = [], []
    for line, file_name, raw in _progress(entries, f"checking {os.path.basename(rows.csv_path)}"):
        key = _label_key(raw, numeric) if (not numeric or _is_int(raw)) else None
        if key not in mapping:
            rows.reject(line, f"unknown label {raw!r} (not in trn.csv)")
            continue
        path = os.path.join(jpg_dir, file_name)
        if not os.path.isfile(path):
            rows.reject(line, f"missing image file {path}")
            continue
        if not _valid_image(path):
            rows.reject(line, f"corrupt image {path}")
            continue
        paths.append(path)
        labels.append(mapping[key])
    rows.report()
    if not paths:
        raise ValueError(f"image_folder: no usable rows in {rows.csv_path}")
    return Source(np.array(paths, dtype=object), np.array(labels, dtype=np.int32), "path")


def load(data_dir: str, image_size: int | None = None, test_split: str | None = None, on_bad_file: str = "fail"):
    if data_dir is None:
        raise ValueError("image_folder needs data_dir (containing jpg/ and lists/)")
    if on_bad_file not in ("fail", "skip"):
        raise ValueError(f"on_bad_file must be 'fail' or 'skip', got {on_bad_file!r}")
    test_split = test_split or "tst"
    if test_split not in TEST_SPLITS:
        raise ValueError(f"image_folder test_split must be one of {TEST_SPLITS}, got {test_split!r}")
    lists_dir = os.path.join(data_dir, "lists")
    jpg_dir = os.path.join(data_dir, "jpg")
    for d in (lists_dir, jpg_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"image_folder: missing directory {d}")

    trn_rows = _Rows(os.path.join(lists_dir, "trn.csv"), on_bad_file)
    tst_rows = _Rows(os.path.join(lists_dir, f"{test_split}.csv"), on_bad_file)
    trn = _read_csv(trn_rows.csv_path, trn_rows)
    tst = _read_csv(tst_rows.csv_path, tst_rows)

    raw_labels = {raw for _, _, raw in trn}
    numeric = all(_is_int(r) for r in raw_labels)
    keys = sorted({_label_key(r, numeric) for r in raw_labels})
    mapping = {k: i for i, k in enumerate(keys)}

    train = _build(trn, mapping, numeric, jpg_dir, trn_rows)
    test = _build(tst, mapping, numeric, jpg_dir, tst_rows)
    size = int(image_size or DEFAULT_SIZE)
    transform = ResizedCropTransform(
        kind="path", size=size, resize=int(round(size * 256 / 224)), mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    return train, test, len(keys), tuple(str(k) for k in keys), transform
