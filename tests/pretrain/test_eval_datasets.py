"""Eval inputs: WebDataset shards with cls, image folders and Parquet label files yield the same samples."""

import io
import os
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from pretrain.eval.datasets import detect_format, make_loader, open_dataset
from pretrain.eval.fashion_mnist import (
    CLASSES,
    load_fashion_mnist,
    read_idx,
    write_image_folder,
    write_parquet_labels,
    write_shards,
)
from pretrain.eval.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

N = 240


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same 240 Fashion-MNIST images as shards (4 x 64 + rest), an image folder and a Parquet label file."""
    root = tmp_path_factory.mktemp("fmnist")
    images, labels = load_fashion_mnist("train", N)
    keys = [f"{i:06d}" for i in range(N)]
    os.makedirs(root / "shards")
    shards = write_shards(images, labels, str(root / "shards" / "train-%06d.tar"), maxcount=64, keys=keys)
    write_image_folder(images, labels, str(root / "folder"), keys=keys)
    rel = [f"folder/{int(y)}-{CLASSES[int(y)]}/{k}.png" for k, y in zip(keys, labels)]
    splits = ["train" if i < 180 else "test" for i in range(N)]
    write_parquet_labels(rel, labels, str(root / "labels.parquet"), splits=splits, keys=keys)
    return {"root": root, "images": images, "labels": labels, "keys": keys, "shards": shards}


def _samples(ds):
    """key basename -> (label, tensor)"""
    out = {}
    items = ds if isinstance(ds, IterableDataset) else (ds[i] for i in range(len(ds)))
    for img, label, _, key in items:
        out[key.rsplit("/", 1)[-1]] = (label, img)
    return out


def test_shards_folder_and_parquet_yield_the_same_samples(inputs):
    t = EvalTransform(28)
    root = inputs["root"]
    shards = open_dataset(str(root / "shards" / "train-{000000..000003}.tar"), transform=t)
    folder = open_dataset(str(root / "folder"), transform=t)
    parquet_train = open_dataset(str(root / "labels.parquet"), transform=t, split="train")
    parquet_test = open_dataset(str(root / "labels.parquet"), transform=t, split="test")
    assert len(inputs["shards"]) == 4
    a, b = _samples(shards), _samples(folder)
    c = {**_samples(parquet_train), **_samples(parquet_test)}
    assert len(parquet_train) == 180 and len(parquet_test) == 60
    assert sorted(a) == sorted(b) == sorted(c) == inputs["keys"]
    assert folder.classes == [f"{i}-{n}" for i, n in enumerate(CLASSES)]
    for i, key in enumerate(inputs["keys"]):
        assert a[key][0] == b[key][0] == c[key][0] == int(inputs["labels"][i])
        torch.testing.assert_close(a[key][1], b[key][1], rtol=0, atol=0)
        torch.testing.assert_close(a[key][1], c[key][1], rtol=0, atol=0)
    # Without resampling (resize 28 -> 28) the pixels are the idx file's pixels, grey -> RGB.
    img, label, _, key = next(iter(open_dataset(inputs["shards"][0], transform=EvalTransform(28, resize_size=28))))
    assert key == "000000" and label == int(inputs["labels"][0])
    px = img * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    for c in range(3):
        np.testing.assert_allclose(px[c].numpy() * 255, inputs["images"][0], atol=1e-3)


def test_order_is_deterministic_whatever_the_workers(inputs):
    ds = open_dataset(str(inputs["root"] / "shards" / "train-{000000..000003}.tar"), transform=EvalTransform(28))
    def keys_in_order(workers):
        keys, orders = [], []
        for _, _, order, k in make_loader(ds, 50, workers):
            keys += k
            orders += order.tolist()
        return [k for _, k in sorted(zip(orders, keys))]
    assert keys_in_order(0) == keys_in_order(2) == inputs["keys"]
    folder = open_dataset(str(inputs["root"] / "folder"), transform=EvalTransform(28))
    folder_keys = [folder.records[i][0] for i in range(len(folder))]
    assert folder_keys == sorted(folder_keys)  # class folder, then file name
    small = open_dataset(str(inputs["root"] / "folder"), transform=None, limit=25)
    per_class = np.bincount([r[2] for r in small.records], minlength=10)
    assert per_class.tolist() == [3] * 5 + [2] * 5  # round-robin over classes, not the first classes only
    assert [r[0] for r in small.records] == sorted(r[0] for r in small.records)


def test_shard_inputs_brace_lists_directories_and_fsspec_urls(inputs):
    root = inputs["root"]
    d = root / "shards"
    expected = inputs["keys"]
    t = EvalTransform(28)
    brace = open_dataset(str(d / "train-{000000..000001}.tar"), transform=t, limit=100)
    assert [s[0] for s in brace.samples] == expected[:100]
    listed = open_dataset(f"{d}/train-000002.tar::{d}/train-000003.tar", transform=t)
    assert listed.urls == [f"{d}/train-000002.tar", f"{d}/train-000003.tar"]
    assert detect_format(str(d)) == "wds"
    whole = open_dataset(str(d), transform=None)
    assert len(whole.urls) == 4
    mem = fsspec.filesystem("memory")
    for i, path in enumerate(inputs["shards"]):
        with open(path, "rb") as f:
            mem.pipe(f"/evalds/s-{i:06d}.tar", f.read())
    via_memory = _samples(open_dataset("memory://evalds/s-{000000..000003}.tar", transform=t))
    assert sorted(via_memory) == expected
    assert via_memory["000123"][0] == int(inputs["labels"][123])


def test_parquet_labels_split_column_and_string_labels(inputs, tmp_path):
    root = inputs["root"]
    with pytest.raises(ValueError, match="train_split"):
        open_dataset(str(root / "labels.parquet"), transform=None)  # mixes train/test rows
    with pytest.raises(ValueError, match="no rows"):
        open_dataset(str(root / "labels.parquet"), transform=None, split="val")
    names = [CLASSES[int(y)] for y in inputs["labels"][:20]]
    paths = [str(p) for p in sorted((root / "folder").rglob("*.png"))][:20]
    pq.write_table(pa.table({"path": paths, "label": names}), tmp_path / "named.parquet")
    train = open_dataset(str(tmp_path / "named.parquet"), transform=None)
    assert train.classes == sorted(set(names))
    assert [r[2] for r in train.records] == [train.classes.index(n) for n in names]
    # The test split reuses the train classes; an unseen class is an error, never a silent new label.
    pq.write_table(pa.table({"path": paths[:2], "label": ["trouser", "unicorn"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="unicorn"):
        open_dataset(str(tmp_path / "bad.parquet"), transform=None, classes=train.classes)
    with pytest.raises(ValueError, match="named classes"):
        open_dataset(str(root / "shards" / "train-000000.tar"), transform=None, classes=train.classes)
    pq.write_table(pa.table({"file": paths[:2], "label": [1, 2]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match="'uri' \\(or 'path'\\)"):
        open_dataset(str(tmp_path / "nocol.parquet"), transform=None)


def test_bad_shards_fail_with_clear_errors(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    with wds.ShardWriter(str(tmp_path / "nocls-%06d.tar"), maxcount=10, verbose=0) as sink:
        sink.write({"__key__": "a", "png": buf.getvalue()})
    with pytest.raises(ValueError, match="no 'cls' label"):
        list(open_dataset(str(tmp_path / "nocls-000000.tar"), transform=None))
    with tarfile.open(tmp_path / "corrupt.tar", "w") as tar:
        for name, data in (("x.png", b"not a png"), ("x.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="cannot decode image x"):
        list(open_dataset(str(tmp_path / "corrupt.tar"), transform=None))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither class sub-folders nor .tar"):
        open_dataset(str(tmp_path / "empty"), transform=None)
    with pytest.raises(ValueError, match="not a .tar shard pattern, a .parquet file or a directory"):
        open_dataset(str(tmp_path / "missing"), transform=None)


def test_eval_transform_resizes_short_side_and_centre_crops():
    t = EvalTransform(56)
    assert t.resize_size == 64 and EvalTransform(224).resize_size == 256
    # A 100x50 image whose left/right quarters are black and middle is white: after resize to 128x64 and a
    # central 56 crop, everything comes from the white middle band.
    arr = np.zeros((50, 100, 3), dtype=np.uint8)
    arr[:, 25:75] = 255
    x = t(Image.fromarray(arr))
    assert x.shape == (3, 56, 56)
    crop = np.asarray(t.resize_crop(Image.fromarray(arr)))
    assert crop.shape == (56, 56, 3)
    assert crop[:, 20:36].min() == 255  # the central columns are white
    white = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(x[:, 28, 28], white)
    # bicubic, not bilinear: matches PIL's BICUBIC resize exactly
    img = Image.fromarray(load_fashion_mnist("test", 1)[0][0])
    ref = np.asarray(img.convert("RGB").resize((64, 64), Image.BICUBIC))[4:60, 4:60]
    np.testing.assert_array_equal(np.asarray(t.resize_crop(img)), ref)
    with pytest.raises(ValueError, match="resize_size"):
        EvalTransform(56, resize_size=40)


def test_read_idx_matches_header(tmp_path):
    images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="unsigned-byte idx"):
        read_idx(str(tmp_path / "bad"))


def test_image_folder_and_parquet_on_an_fsspec_filesystem(tmp_path):
    mem = fsspec.filesystem("memory")
    for c in ("bird", "cat"):
        for i in range(3):
            buf = io.BytesIO()
            Image.new("L", (8, 8), 40 * i + (c == "cat")).save(buf, format="PNG")
            mem.pipe(f"/evalfolder/{c}/{i}.png", buf.getvalue())
    folder = open_dataset("memory://evalfolder", transform=None)
    assert folder.classes == ["bird", "cat"]
    assert [r[0] for r in folder.records] == ["bird/0", "bird/1", "bird/2", "cat/0", "cat/1", "cat/2"]
    img, label, order, key = folder[4]
    assert (label, order, key) == (1, 4, "cat/1") and img.getpixel((0, 0)) == 41
    write_parquet_labels(["cat/1.png", "bird/2.png"], ["cat", "bird"], str(tmp_path / "l.parquet"))
    mem.pipe("/evalfolder/labels.parquet", (tmp_path / "l.parquet").read_bytes())
    labels = open_dataset("memory://evalfolder/labels.parquet", transform=None, classes=folder.classes)
    assert [(r[1], r[2]) for r in labels.records] == [("memory:///evalfolder/cat/1.png", 1),
                                                      ("memory:///evalfolder/bird/2.png", 0)]
    assert labels[0][0].getpixel((0, 0)) == 41
