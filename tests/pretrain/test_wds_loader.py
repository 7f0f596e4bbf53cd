"""WebDataset loader: reads ShardWriter shards like webdataset does, splits shards by rank and worker, mixes
weighted shard sets, skips and counts corrupt data, and resumes exactly from ``state_dict()``."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pretrain.data.augment import MultiCropConfig
from pretrain.data.loader import WdsLoader
from pretrain.data.wds import MixedStream, SetStream, WdsConfig, expand_shards, read_shard

FMNIST = "/usr/share/datasets/fashion-mnist"
CROPS = MultiCropConfig(global_size=28, local_size=14, n_local=2)


def fashion_mnist(n: int) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(f"{FMNIST}/train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(16 + n * 784)[16:], dtype=np.uint8).reshape(n, 28, 28)
    with gzip.open(f"{FMNIST}/train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(8 + n)[8:], dtype=np.uint8)
    return images, labels


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    """Set "a": 8 shards x 10 labelled samples; "c": 4 x 10; "bad": corrupt images, a sample without image,
    a truncated shard and a file that is not a tar."""
    root = tmp_path_factory.mktemp("shards")
    images, labels = fashion_mnist(130)
    with wds.ShardWriter(str(root / "a-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(80):
            sink.write({"__key__": f"a{i:04d}", "jpg": jpeg(images[i]), "cls": int(labels[i])})
    with wds.ShardWriter(str(root / "c-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(40):
            sink.write({"__key__": f"c{i:04d}", "jpg": jpeg(images[80 + i]), "cls": int(labels[80 + i])})
    good = jpeg(images[120])
    with wds.TarWriter(str(root / "bad-000000.tar")) as sink:
        for i in range(7):
            sink.write({"__key__": f"good{i}", "jpg": jpeg(images[121 + i])})
            if i == 2:
                sink.write({"__key__": "badjpg0", "jpg": good[: len(good) // 2]})  # truncated JPEG
                sink.write({"__key__": "noimg0", "txt": "no image here"})
            if i == 4:
                sink.write({"__key__": "badjpg1", "jpg": b"\xff\xd8 this is not a jpeg"})
    with wds.TarWriter(str(root / "bad-000001.tar")) as sink:
        for i in range(10):
            sink.write({"__key__": f"trunc{i}", "jpg": jpeg(images[i])})
    data = (root / "bad-000001.tar").read_bytes()
    (root / "bad-000001.tar").write_bytes(data[: int(len(data) * 0.55)])
    (root / "bad-000002.tar").write_bytes(b"garbage, not a tar file" * 40)
    return {"a": f"{root}/a-{{000000..000007}}.tar", "c": f"{root}/c-{{000000..000003}}.tar",
            "bad": f"{root}/bad-{{000000..000002}}.tar", "root": str(root)}


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def ids(batches: list[dict]) -> list[tuple[str, str]]:
    return [(u, k) for b in batches for u, k in zip(b["urls"], b["keys"])]


def test_reader_matches_webdataset(shards):
    urls = expand_shards(shards["a"])
    assert len(urls) == 8
    ours = [(s["__key__"], s["jpg"], s["cls"]) for u in urls for s in read_shard(u)]
    ref = [(s["__key__"], s["jpg"], s["cls"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert ours == ref and len(ours) == 80


def test_epochs_cover_every_sample_once_and_reshuffle(shards):
    urls = expand_shards(shards["a"])
    stream = SetStream(urls, set_index=0, stream_id=0, n_streams=1, seed=3, reseed=0, shards_per_window=2,
                       shuffle_buffer=16)
    keys = [s["__key__"] for s in itertools.islice(iter(stream), 160)]
    everything = sorted(f"a{i:04d}" for i in range(80))
    assert sorted(keys[:80]) == everything and sorted(keys[80:]) == everything
    assert keys[:80] != keys[80:] and keys[:80] != everything  # shuffled, and reshuffled per epoch
    assert (stream.window, stream.offset) == (7, 20)  # the 8th window of 2 shards, fully read


def test_streams_split_shards_by_rank_and_worker(shards):
    urls = expand_shards(shards["a"])
    per_stream = []
    for s in range(4):  # 2 ranks x 2 workers
        st = SetStream(urls, set_index=0, stream_id=s, n_streams=4, seed=0, reseed=0, shards_per_window=2,
                       shuffle_buffer=8)
        per_stream.append({x["__key__"] for x in itertools.islice(iter(st), 20)})
    assert all(len(k) == 20 for k in per_stream)
    assert set.union(*per_stream) == {f"a{i:04d}" for i in range(80)}  # disjoint and complete


def test_weighted_shard_sets(shards):
    sets = [expand_shards(shards["a"]), expand_shards(shards["c"])]
    stream = MixedStream(sets, np.array([0.75, 0.25]), stream_id=0, n_streams=1, seed=0, reseed=0,
                         shards_per_window=1, shuffle_buffer=4)
    picks = [i for i, _ in itertools.islice(iter(stream), 400)]
    assert 0.68 < picks.count(0) / 400 < 0.82
    state = stream.state_dict()
    assert state["t"] == 400 and sum(w * 10 + o for w, o in state["sets"]) == 400


def loader_cfg(urls, **kw) -> WdsConfig:
    base = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, "shards_per_window": 1, "seed": 11,
            "label_key": "cls"}
    return WdsConfig(urls=urls, **{**base, **kw})


def test_batches_content_labels_and_file_urls(shards):
    cfg = loader_cfg([f"file://{shards['a']}"], shards_per_window=2, shuffle_buffer=16)
    loader = WdsLoader(cfg, CROPS, patch_size=7)
    batches = take(loader, 20)  # one epoch of the single stream
    assert sorted(k for _, k in ids(batches)) == sorted(f"a{i:04d}" for i in range(80))
    _, labels = fashion_mnist(80)
    b = batches[0]
    assert b["global_crops"].shape == (8, 3, 28, 28) and b["local_crops"].shape == (8, 3, 14, 14)
    assert b["masks"].shape == (8, 16) and b["batch_index"] == 0
    assert b["labels"].tolist() == [int(labels[int(k[1:])]) for k in b["keys"]]
    assert loader.metrics() == {"corrupt_image": 0, "missing_image": 0, "missing_label": 0, "corrupt_shards": 0,
                                "batches": 20, "samples": 80}


@pytest.mark.parametrize(("num_workers", "world_size"), [(0, 1), (2, 2)])
def test_exact_resume(shards, num_workers, world_size):
    cfg = loader_cfg([shards["a"], shards["c"]], weights=[2.0, 1.0], num_workers=num_workers)
    n, k = 7, 3
    for rank in range(world_size):
        straight = take(WdsLoader(cfg, CROPS, patch_size=7, rank=rank, world_size=world_size), n)
        first_loader = WdsLoader(cfg, CROPS, patch_size=7, rank=rank, world_size=world_size)
        first = take(first_loader, k)
        state = json.loads(json.dumps(first_loader.state_dict()))
        resumed_loader = WdsLoader(cfg, CROPS, patch_size=7, rank=rank, world_size=world_size)
        resumed_loader.load_state_dict(state)
        rest = take(resumed_loader, n - k)
        assert ids(first + rest) == ids(straight)
        assert [b["batch_index"] for b in first + rest] == list(range(n))
        for a, b in zip(first + rest, straight):
            for key in ("global_crops", "local_crops", "masks", "labels", "sets"):
                assert torch.equal(a[key], b[key]), key
        rng_state = torch.get_rng_state()
        again = take(first_loader, n - k)  # iterating the same loader again continues too
        assert ids(again) == ids(rest)
        assert torch.equal(torch.get_rng_state(), rng_state)  # the global torch RNG is left alone
    if world_size == 2:
        rank0 = ids(take(WdsLoader(cfg, CROPS, patch_size=7, rank=0, world_size=2), 4))
        rank1 = ids(take(WdsLoader(cfg, CROPS, patch_size=7, rank=1, world_size=2), 4))
        assert not set(rank0) & set(rank1)


def test_corrupt_samples_are_skipped_and_counted(shards):
    cfg = loader_cfg([shards["bad"]], shards_per_window=3, shuffle_buffer=1)
    loader = WdsLoader(cfg, CROPS, patch_size=7)
    batches = take(loader, 5)
    keys = [k for _, k in ids(batches)]
    assert all(k.startswith(("good", "trunc")) for k in keys)
    assert {f"good{i}" for i in range(7)} <= set(keys) and any(k.startswith("trunc") for k in keys)
    m = loader.metrics()
    passes = keys.count("good0")  # each pass over the 3 shards: 2 corrupt JPEGs, 1 sample without image
    assert passes >= 2
    assert 2 * (passes - 1) < m["corrupt_image"] <= 2 * passes and passes - 1 <= m["missing_image"] <= passes
    assert 2 * (passes - 1) <= m["corrupt_shards"] <= 2 * (passes + 1)  # truncated tar + garbage file per pass
    assert m["missing_label"] == 20 and all(b["labels"].eq(-1).all() for b in batches)
    state = loader.state_dict()
    resumed = WdsLoader(cfg, CROPS, patch_size=7)
    resumed.load_state_dict(state)
    assert resumed.metrics() == m  # the counters are part of the data position


def test_layout_change_needs_non_strict(shards):
    cfg = loader_cfg([shards["a"]])
    loader = WdsLoader(cfg, CROPS, patch_size=7)
    take(loader, 2)
    state = loader.state_dict()
    other = WdsLoader(loader_cfg([shards["a"]], batch_size=2), CROPS, patch_size=7)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    batch = take(other, 1)[0]
    assert batch["batch_index"] == 2 and other.batches_consumed == 3
    assert not set(batch["keys"]) & set(k for _, k in ids(take(WdsLoader(cfg, CROPS, patch_size=7), 1)))
    fresh = WdsLoader(cfg, CROPS, patch_size=7)
    fresh.restart_at(5)  # no state at all, e.g. the other ranks' layout is gone
    assert take(fresh, 1)[0]["batch_index"] == 5 and fresh.batches_consumed == 6


def test_config_and_url_errors(shards):
    with pytest.raises(ValueError, match="weights"):
        WdsConfig(urls=["x.tar", "y.tar"], weights=[1.0])
    with pytest.raises(ValueError, match="batch_size"):
        WdsConfig(urls=["x.tar"], batch_size=0)
    with pytest.raises(ValueError, match="urls"):
        WdsConfig(urls=[])
    with pytest.raises(ValueError, match="do not exist"):
        expand_shards(os.path.join(shards["root"], "missing-{000000..000003}.tar"))
    with pytest.raises(ValueError, match="rank"):
        WdsLoader(loader_cfg([shards["a"]]), CROPS, patch_size=7, rank=2, world_size=2)


def test_all_shards_bad_raises_clear_error(shards):
    garbage = os.path.join(shards["root"], "bad-000002.tar")
    stream = SetStream([garbage], set_index=0, stream_id=0, n_streams=1, seed=0, reseed=0, shards_per_window=1,
                       shuffle_buffer=1, max_empty_shards=5)
    with pytest.raises(ValueError, match="gave no samples"):
        next(iter(stream))


def test_reads_shards_over_http(shards):
    """fsspec http:// URLs (a local server on 127.0.0.1) give the same stream as the local files."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=shards["root"]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a-{{000000..000007}}.tar"
        kw = {"set_index": 0, "stream_id": 1, "n_streams": 2, "seed": 5, "reseed": 0, "shards_per_window": 2,
              "shuffle_buffer": 8}
        remote = SetStream(expand_shards(url), **kw)
        local = SetStream(expand_shards(shards["a"]), **kw)
        got = [(s["__key__"], s["jpg"]) for s in itertools.islice(iter(remote), 30)]
        assert got == [(s["__key__"], s["jpg"]) for s in itertools.islice(iter(local), 30)]
        assert remote.corrupt_shards == 0
        batch = take(WdsLoader(loader_cfg([url]), CROPS, patch_size=7), 1)[0]
        assert batch["urls"][0].startswith("http://127.0.0.1") and batch["global_crops"].shape == (8, 3, 28, 28)
    finally:
        server.shutdown()
        server.server_close()


def test_config_builds_from_recipe_values():
    from pretrain.utils.config import build

    cfg = build(WdsConfig, {"urls": ["s3://bucket/a-{000000..000009}.tar", "/data/b-{0..3}.tar"],
                            "weights": [2, 1], "label_key": "cls", "num_workers": 2})
    assert cfg.set_weights.tolist() == pytest.approx([2 / 3, 1 / 3]) and cfg.image_keys == ["jpg", "jpeg", "png",
                                                                                              "webp"]
    assert expand_shards(cfg.urls[0])[-1] == "s3://bucket/a-000009.tar"  # remote shards are not stat'ed
    with pytest.raises(ValueError, match="num_workers"):
        build(WdsConfig, {"urls": ["x.tar"], "num_workers": -1})
