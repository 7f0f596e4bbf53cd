"""The curation demo: a Fashion-MNIST pool with known copies, photos and broken files, curated end to end.

``prepare_demo_data(dir)`` writes the inputs (nothing is downloaded; Fashion-MNIST comes from the Debian package
``dataset-fashion-mnist`` at ``/usr/share/datasets/fashion-mnist``):

* the uncurated pool (``pool/``): ``pool_size`` Fashion-MNIST *train* images as PNG, half as loose files
  ``images/<class>/<index>.png`` and half inside tar shards ``tars/pool-NNNNNN.tar`` (members
  ``<class>/<index>.png``); ``exact_duplicates`` tar images also stored as loose files (same bytes: they collapse at
  ingest); injected near-duplicates of ``copy_fraction`` of the pool (flip, 2-3x upscale, +-10% brightness or
  contrast, JPEG q90, upscale+flip+JPEG) with their ground truth; the 12 ``mate-backgrounds`` nature photos
  (unlabelled); and 7 broken files (empty, text named .jpg, random bytes, truncated PNG/JPEG, corrupt PNG chunk,
  a 1x1 image);
* the curated seed set (``seeds/<class>/<index>.png``): ``n_seeds`` Fashion-MNIST *test* images of
  ``seed_classes``.

``run_curation_demo(out_dir)`` runs ``recipes/demo.toml`` (ingest -> embed with the built-in descriptor ->
dedupe -> hierarchical k-means + balanced sampling -> kNN retrieval, N=4 -> WebDataset shards of labelled
samples (JPEG + ``cls``; the unlabelled photos are left out) -> report) on an in-process Ray and returns the
funnel, the dedup precision/recall against the injected copies, the retrieval precision (fraction of retrieved
pool images whose label is a seed class), the NMI of the level-1 and top-level clusters against the labels,
and where the shards and the report are.
``python -m curation.demo OUT_DIR`` does the same from the command line.

Curation with other embedders on the same pool (``bench/curation_bootstrap.py``, the end-to-end demo's last
step): ``embedder_overrides`` (``descriptor``, ``pixels`` or a backbone export's path), ``curate_retrieval`` (ingest
-> embed -> dedupe -> retrieve with one or several seed sets), ``retrieval_by_class`` (precision: retrieved pool
images of the seed's class, per seed class) and ``bootstrap_retrieval`` (descriptor vs exported teacher on the
demo's and a held-out seed set, reusing the curation run's ingest).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from pretrain.eval.fashion_mnist import read_idx

__all__ = ["CLASSES", "DEMO_SEED_CLASSES", "HELD_OUT_CLASSES", "RETRIEVAL_STAGES", "DemoData", "bootstrap_retrieval",
           "curate_retrieval", "demo_data", "embedder_overrides", "format_summary",
           "main", "nmi", "prepare_demo_data", "retrieval_by_class", "run_curation_demo", "seed_class_of",
           "write_seed_set"]

log = logging.getLogger(__name__)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
PHOTOS = "/usr/share/backgrounds/mate/nature"
#: Fashion-MNIST class names, in label order (directory names of the demo pool and seeds).
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
_COPY_OPS = ("flip", "upscale", "brightness", "contrast", "jpeg", "upscale_flip_jpeg")


@dataclass
class DemoData:
    """Where the demo inputs are and their ground truth."""

    root: str
    """Directory holding ``pool/`` and ``seeds/``."""
    pool_sources: list[str]
    """Ingest sources of the uncurated pool."""
    seed_sources: list[str]
    """Sources of the curated seed set."""
    seed_classes: list[str]
    """Classes of the seed images."""
    labels: dict[str, int] = field(repr=False)
    """uid (sha1 of the bytes) -> label of every Fashion-MNIST pool image, copies included."""
    copy_pairs: list[tuple[str, str]] = field(repr=False)
    """(original uid, injected near-duplicate uid)."""
    fashion_images: int = 0
    """Fashion-MNIST pool images (before copies and duplicates)."""
    exact_duplicates: int = 0
    """Pool images stored twice with identical bytes."""
    photos: int = 0
    """Nature photos added to the pool."""
    broken: int = 0
    """Broken files added to the pool."""
    seeds: int = 0
    """Seed images."""


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _copy(arr: np.ndarray, op: str) -> tuple[bytes, str]:
    """A near-duplicate of a 28x28 image: ``(bytes, extension)``."""
    im = Image.fromarray(arr)
    if op == "flip":
        return _png(ImageOps.mirror(im)), "png"
    if op == "upscale":
        return _png(im.resize((84, 84), Image.BICUBIC)), "png"
    if op == "brightness":
        return _png(ImageEnhance.Brightness(im).enhance(1.1)), "png"
    if op == "contrast":
        return _png(ImageEnhance.Contrast(im).enhance(0.9)), "png"
    if op == "jpeg":
        return _jpeg(im, 90), "jpg"
    return _jpeg(ImageOps.mirror(im.resize((56, 56), Image.BICUBIC)), 85), "jpg"


def _broken_files(d: Path, photo: str | None) -> int:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    big = _png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    corrupt = bytearray(big)
    i = big.index(b"IDAT") + 20
    corrupt[i : i + 4] = bytes(b ^ 0xFF for b in corrupt[i : i + 4])
    files = {
        "empty.png": b"",
        "readme.jpg": b"this is a text file with an image extension\n",
        "noise.jpg": rng.integers(0, 255, 4096, dtype=np.uint8).tobytes(),
        "truncated.png": big[: len(big) // 2],
        "corrupt_chunk.png": bytes(corrupt),
        "one_pixel.png": _png(Image.new("RGB", (1, 1), (200, 10, 10))),
    }
    if photo:
        data = Path(photo).read_bytes()
        files["truncated_photo.jpg"] = data[: len(data) // 3]
    for name, data in files.items():
        (d / name).write_bytes(data)
    return len(files)


def write_seed_set(seeds_dir: str | os.PathLike, seed_classes: Sequence[str], n_seeds: int,
                   rng: np.random.Generator | int) -> np.ndarray:  # fmt: skip
    """Write ``n_seeds`` Fashion-MNIST *test* images of ``seed_classes`` as ``seeds_dir/<class>/<index>.png``
    (drawn with ``rng``, or a generator seeded with it); return the chosen test indices."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    xt = read_idx(f"{FASHION_MNIST}/t10k-images-idx3-ubyte.gz")
    yt = read_idx(f"{FASHION_MNIST}/t10k-labels-idx1-ubyte.gz")
    wanted = [CLASSES.index(c) for c in seed_classes]
    candidates = np.flatnonzero(np.isin(yt, wanted))
    chosen = np.sort(rng.choice(candidates, size=min(n_seeds, len(candidates)), replace=False))
    for i in chosen.tolist():
        d = Path(seeds_dir) / CLASSES[yt[i]]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.png").write_bytes(_png(Image.fromarray(xt[i])))
    return chosen


def prepare_demo_data(root: str | os.PathLike, *, pool_size: int = 6000, n_seeds: int = 300,
                      seed_classes: Sequence[str] = ("trouser", "bag", "ankle-boot"), copy_fraction: float = 0.03,
                      exact_duplicates: int = 20, tar_shards: int = 2, seed: int = 0) -> DemoData:  # fmt: skip
    """Write the demo pool and seed set under ``root`` (see the module docstring) and return their ground truth."""
    if not 10 <= pool_size <= 60_000:
        raise ValueError(f"pool_size must be in 10..60000 (Fashion-MNIST train), got {pool_size}")
    unknown = [c for c in seed_classes if c not in CLASSES]
    if unknown or not seed_classes:
        raise ValueError(f"seed_classes must be Fashion-MNIST classes {CLASSES}, got {list(seed_classes)}")
    if not 0 <= copy_fraction <= 1 or n_seeds < 1 or tar_shards < 1 or exact_duplicates < 0:
        raise ValueError("copy_fraction must be in [0, 1], n_seeds and tar_shards >= 1, exact_duplicates >= 0")
    root = Path(root)
    pool, seeds_dir = root / "pool", root / "seeds"
    rng = np.random.default_rng(seed)
    x = read_idx(f"{FASHION_MNIST}/train-images-idx3-ubyte.gz")
    y = read_idx(f"{FASHION_MNIST}/train-labels-idx1-ubyte.gz")
    idx = np.sort(rng.permutation(len(x))[:pool_size])
    labels: dict[str, int] = {}
    png: dict[int, bytes] = {}
    tar_members: list[list[tuple[str, bytes]]] = [[] for _ in range(tar_shards)]
    for n, i in enumerate(idx.tolist()):
        data = _png(Image.fromarray(x[i]))
        png[i] = data
        labels[hashlib.sha1(data).hexdigest()] = int(y[i])
        rel = f"{CLASSES[y[i]]}/{i:05d}.png"
        if n % 2 == 0:
            (pool / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            (pool / "images" / rel).write_bytes(data)
        else:
            tar_members[(n // 2) % tar_shards].append((rel, data))
    (pool / "tars").mkdir(parents=True, exist_ok=True)
    for k, members in enumerate(tar_members):
        with tarfile.open(pool / "tars" / f"pool-{k:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for rel, data in members:
                info = tarfile.TarInfo(rel)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
    in_tars = [int(rel.rsplit("/", 1)[1][:5]) for members in tar_members for rel, _ in members]
    dups = in_tars[:exact_duplicates]
    for i in dups:
        (pool / "images" / CLASSES[y[i]] / f"dup-{i:05d}.png").write_bytes(png[i])
    copy_pairs: list[tuple[str, str]] = []
    originals = rng.choice(idx, size=round(copy_fraction * pool_size), replace=False)
    for c, i in enumerate(np.sort(originals).tolist()):
        op = _COPY_OPS[c % len(_COPY_OPS)]
        data, ext = _copy(x[i], op)
        (pool / "images" / CLASSES[y[i]] / f"copy-{i:05d}-{op}.{ext}").write_bytes(data)
        uid = hashlib.sha1(data).hexdigest()
        labels[uid] = int(y[i])
        copy_pairs.append((hashlib.sha1(png[i]).hexdigest(), uid))
    photos = sorted(Path(PHOTOS).glob("*.jpg")) if Path(PHOTOS).is_dir() else []
    (pool / "photos").mkdir(parents=True, exist_ok=True)
    for p in photos:
        (pool / "photos" / p.name).write_bytes(p.read_bytes())
    n_broken = _broken_files(pool / "broken", str(photos[0]) if photos else None)
    chosen = write_seed_set(seeds_dir, seed_classes, n_seeds, rng)
    log.info("demo data in %s: %d fashion images (+%d exact duplicates, %d copies), %d photos, %d broken, "
             "%d seeds of %s", root, pool_size, len(dups), len(copy_pairs), len(photos), n_broken, len(chosen),
             list(seed_classes))  # fmt: skip
    return DemoData(root=str(root), pool_sources=[str(pool)], seed_sources=[str(seeds_dir)],
                    seed_classes=list(seed_classes), labels=labels, copy_pairs=copy_pairs, fashion_images=pool_size,
                    exact_duplicates=len(dups), photos=len(photos), broken=n_broken, seeds=len(chosen))  # fmt: skip


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two labelings, ``I(a; b) / mean(H(a), H(b))`` (arithmetic mean)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if len(a) != len(b) or not len(a):
        raise ValueError("nmi needs two non-empty labelings of the same length")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    p = joint / len(a)
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    h = lambda q: float(-(q[q > 0] * np.log(q[q > 0])).sum())  # noqa: E731
    denom = (h(pa) + h(pb)) / 2
    return 1.0 if denom == 0 else mi / denom


def _dedup_figures(run_dir: str, data: DemoData) -> dict[str, Any]:
    from curation.io.fs import join, read_json, read_parquet
    from curation.io.parts import part_name

    rec = read_json(join(run_dir, "dedup", "_SUCCESS.json"))
    comp: dict[str, int] = {}
    for i in range(int(rec["dedup_parts"])):
        t = read_parquet(join(run_dir, "dedup", part_name(i)), columns=["uid", "component"])
        comp.update(zip(t["uid"].to_pylist(), t["component"].to_pylist()))
    sizes = np.bincount(np.fromiter(comp.values(), np.int64)) if comp else np.zeros(0, np.int64)
    predicted = int((sizes * (sizes - 1) // 2).sum())
    truth = [(a, b) for a, b in data.copy_pairs if a in comp and b in comp and a != b]
    found = sum(comp[a] == comp[b] for a, b in truth)
    return {
        "injected_pairs": len(truth),
        "predicted_pairs": predicted,
        "true_positive_pairs": found,
        "precision": round(found / predicted, 4) if predicted else 1.0,
        "recall": round(found / len(truth), 4) if truth else 1.0,
        "removed": int(rec["rejected"].get("duplicate", 0)),
    }


def _evaluate(run_dir: str, data: DemoData, records: dict[str, Any]) -> dict[str, Any]:
    from curation.io.artifacts import load_assignments, retrieval_parts
    from curation.io.fs import read_parquet

    ing, emb, ded = records["ingest"], records["embed"], records["dedupe"]
    ret, shard = records["retrieve"], records["shard"]
    funnel = {
        "source_files": ing["in"],
        "rejected": ing["rejected"],
        "exact_duplicates_collapsed": ing["duplicates"],
        "unique_images": ing["out"],
        "embedded": emb["out"],
        "kept_after_dedupe": ded["out"],
        "near_duplicates_removed": ded["rejected"].get("duplicate", 0),
        "selected": ret["out"],
        "selected_by_reason": ret["reasons"],
        "sharded": shard["out"],
        "unlabelled_left_out": shard["rejected"].get("unlabelled", 0),
        "shards": shard["shards"],
    }
    retrieved = sorted({u for url in retrieval_parts(run_dir) for u in read_parquet(url, columns=["uid"])["uid"]
                        .to_pylist()})  # fmt: skip
    seed_labels = {CLASSES.index(c) for c in data.seed_classes}
    hits = [data.labels.get(u, -1) in seed_labels for u in retrieved]
    assign = load_assignments(run_dir)
    uids = assign["uid"].to_pylist()
    labelled = [i for i, u in enumerate(uids) if u in data.labels]
    truth = np.array([data.labels[uids[i]] for i in labelled])
    top = [c for c in assign.column_names if c[0] == "l" and c[1:].isdigit()][-1]
    stats = next(iter(ret["seed_sets"].values()))
    return {
        "funnel": funnel,
        "dedup": _dedup_figures(run_dir, data),
        "retrieval": {"seeds": stats["seeds"], "pairs": stats["pairs"], "retrieved": len(retrieved),
                      "precision": round(float(np.mean(hits)), 4) if hits else 0.0,
                      "collided": stats["collided"], "max_seeds_per_image": stats["max_seeds_per_image"]},
        "nmi": {"level1": round(nmi(np.asarray(assign["l1"])[labelled], truth), 4),
                top: round(nmi(np.asarray(assign[top])[labelled], truth), 4),
                "level1_clusters": int(records["cluster"]["clusters"][0])},
        "balance": {"size_ratio_before": records["cluster"]["size_ratio_before"],
                    "size_ratio_after": records["cluster"].get("size_ratio_after")},
    }  # fmt: skip


_DATA_CACHE: dict[str, tuple[str, DemoData]] = {}


def demo_data(root: str | os.PathLike, **kwargs: Any) -> DemoData:
    """:func:`prepare_demo_data`, reused within this process when ``root`` was written with the same arguments."""
    root = Path(root)
    key = json.dumps({k: list(v) if isinstance(v, (tuple, list)) else v for k, v in kwargs.items()}, sort_keys=True)
    hit = _DATA_CACHE.get(str(root.resolve()))
    if hit and hit[0] == key and root.is_dir():
        return hit[1]
    if root.exists():
        import shutil

        shutil.rmtree(root)
    data = prepare_demo_data(root, **kwargs)
    _DATA_CACHE[str(root.resolve())] = (key, data)
    return data


def run_curation_demo(out_dir: str | os.PathLike, *, pool_size: int = 6000, n_seeds: int = 300, num_cpus: int = 2,
                      address: str = "", seed: int = 0, overrides: Sequence[str] = (),
                      seed_classes: Sequence[str] = ("trouser", "bag", "ankle-boot"),
                      run_name: str = "run") -> dict[str, Any]:  # fmt: skip
    """Prepare the demo data under ``out_dir/data`` and curate it into ``out_dir/<run_name>``; return the figures.

    ``address``: Ray address (empty = the current or a new in-process Ray with ``num_cpus`` CPUs, ``none`` = no
    Ray). ``overrides``: extra ``a.b=value`` settings on top of ``recipes/demo.toml`` (e.g. another embedder:
    ``embed.model="backbone"``, ``embed.name="auto"``, ``embed.weights="<run>/export/teacher.pth"``,
    ``embed.image_size=0``). ``seed_classes``: the classes of the seed set (default: the demo's). The data is
    written once: a second call with the same ``out_dir`` and data arguments reuses it (e.g. to curate the same
    pool with another embedder into another ``run_name``).
    """
    from curation.cli import load_run_config
    from curation.io.fs import atomic_write_bytes, join, read_json
    from curation.ray import executor_for
    from curation.stages import run_stages
    from pretrain.utils.config import dump_toml, to_dict

    t0 = time.perf_counter()
    out = Path(out_dir)
    data = demo_data(out / "data", pool_size=pool_size, n_seeds=n_seeds, seed=seed, seed_classes=seed_classes)
    seeds = json.dumps(data.seed_sources)
    config = load_run_config("demo", [
        f"ingest.sources={json.dumps(data.pool_sources)}",
        f'retrieve.seeds=[{{name="fashion", sources={seeds}, method="knn", n_per_seed=4}}]',
        f"ray.num_cpus={num_cpus}", f"seed={seed}", *overrides,
    ], address or None)  # fmt: skip
    run_dir = str(out / run_name)
    atomic_write_bytes(join(run_dir, "config.toml"), dump_toml(to_dict(config)).encode())
    t_prep = time.perf_counter() - t0
    with executor_for(config.ray) as executor:
        records = run_stages(config, run_dir, executor)
    result = _evaluate(run_dir, data, records)
    index = read_json(join(run_dir, "shards", "index.json"))
    result.update(
        run_dir=run_dir,
        shards=join(run_dir, "shards", index["pattern"]),
        shard_samples=index["count"],
        labelled_samples=index["labelled"],
        report=join(run_dir, "report", "index.html"),
        data={k: v for k, v in asdict(data).items() if k not in ("labels", "copy_pairs")},
        seconds={"prepare": round(t_prep, 1), "total": round(time.perf_counter() - t0, 1),
                 **{name: rec.get("seconds") for name, rec in records.items()}},
    )  # fmt: skip
    log.info("curation demo done in %.1fs: %s", result["seconds"]["total"], format_summary(result))
    return result


def seed_class_of(data: DemoData) -> dict[str, int]:
    """uid -> label of every seed image of ``data`` (its class is the name of its directory)."""
    out: dict[str, int] = {}
    for src in data.seed_sources:
        for p in Path(src).rglob("*.png"):
            out[hashlib.sha1(p.read_bytes()).hexdigest()] = CLASSES.index(p.parent.name)
    return out


def retrieval_by_class(run_dir: str, data: DemoData, seed_set: str | None = None) -> dict[str, Any]:
    """Retrieval precision of a finished retrieve stage against the labels: the fraction of (seed, retrieved pool
    image) pairs whose pool image has the *seed's* class (``precision``, and per seed class), the fraction of
    distinct retrieved images whose label is one of the seed classes (``precision_any_seed_class``, the demo's
    ``retrieval.precision``) and the number of distinct images retrieved; only the pairs of ``seed_set`` when
    given (its seeds must be ``data``'s)."""
    from curation.io.artifacts import retrieval_parts
    from curation.io.fs import read_parquet

    seed_label = seed_class_of(data)
    hits: dict[int, list[bool]] = {CLASSES.index(c): [] for c in data.seed_classes}
    retrieved: set[str] = set()
    for url in retrieval_parts(run_dir):
        t = read_parquet(url, columns=["seed_set", "seed_uid", "uid"])
        for name, s, u in zip(t["seed_set"].to_pylist(), t["seed_uid"].to_pylist(), t["uid"].to_pylist()):
            if seed_set is not None and name != seed_set:
                continue
            c = seed_label.get(s)
            if c is not None:
                hits[c].append(data.labels.get(u, -1) == c)
            retrieved.add(u)
    allowed = set(hits)
    pairs = [h for v in hits.values() for h in v]
    any_class = [data.labels.get(u, -1) in allowed for u in retrieved]
    return {
        "precision": round(float(np.mean(pairs)), 4) if pairs else 0.0,
        "per_class": {CLASSES[c]: round(float(np.mean(v)), 4) if v else None for c, v in hits.items()},
        "precision_any_seed_class": round(float(np.mean(any_class)), 4) if any_class else 0.0,
        "pairs": len(pairs),
        "retrieved": len(retrieved),
    }


#: The stages the retrieval figures need (the demo's, less cluster, shard and report).
RETRIEVAL_STAGES = ("ingest", "embed", "dedupe", "retrieve")


def embedder_overrides(spec: str) -> list[str]:
    """``--set`` overrides of the demo recipe for an embedder: ``descriptor`` (the recipe's), ``pixels`` (raw
    pixels at 28 px, :mod:`curation.models.pixels`) or the path of a backbone export (``teacher.pth``,
    ``backbone.pth`` with its ``.json`` sidecar), embedded at the export's own input size (its ``img_size``;
    28 px, the items' size, for a ResNet)."""
    if spec == "descriptor":
        return ['embed.model="descriptor"']
    if spec == "pixels":
        return ['embed.model="plugin"', 'embed.factory="curation.models.pixels:pixel_embedder"',
                "embed.image_size=28", 'embed.resize="square"']  # fmt: skip
    sidecar = Path(spec + ".json")
    if not sidecar.is_file():
        raise ValueError(f"{spec}: not descriptor, pixels or a backbone export with its .json sidecar")
    size = json.loads(sidecar.read_text()).get("config", {}).get("img_size") or 28  # ResNets: the items' 28 px
    return ['embed.model="backbone"', 'embed.name="auto"', f"embed.weights={json.dumps(str(spec))}",
            f"embed.image_size={size}", 'embed.resize="square"', 'embed.device="cpu"',
            "embed.batch_size=256"]  # fmt: skip


def _seed_sets(sets: dict[str, DemoData]) -> str:
    return "retrieve.seeds=[" + ", ".join(
        f'{{name="{name}", sources={json.dumps(d.seed_sources)}, method="knn", n_per_seed=4}}'
        for name, d in sets.items()) + "]"  # fmt: skip


def curate_retrieval(data: DemoData, run_dir: str, executor: Any, *, overrides: Sequence[str] = (),
                     stages: Sequence[str] = RETRIEVAL_STAGES, num_cpus: int = 2, seed: int = 0,
                     seed_sets: dict[str, DemoData] | None = None) -> dict[str, Any]:  # fmt: skip
    """Curate ``data``'s pool with ``recipes/demo.toml`` (+ ``overrides``) through ``stages`` into ``run_dir``
    on ``executor``; return :func:`retrieval_by_class` plus images kept after dedupe and the wall time.

    ``seed_sets``: several seed sets of the same pool retrieved in one run (name -> data with those seeds; default:
    ``data``'s seeds as the demo's ``fashion`` set); the figures are then under ``by_seed_set``. Stages already
    finished in ``run_dir`` with the same settings are skipped (e.g. ingest of a copied run directory)."""
    from curation.cli import load_run_config
    from curation.stages import run_stages

    t0 = time.perf_counter()
    sets = seed_sets or {"fashion": data}
    config = load_run_config("demo", [
        f"ingest.sources={json.dumps(data.pool_sources)}", _seed_sets(sets),
        f"ray.num_cpus={num_cpus}", f"seed={seed}", f"stages={json.dumps(list(stages))}",
        *([] if "cluster" in stages else ["retrieve.include_balanced=false"]), *overrides,
    ])  # fmt: skip
    records = run_stages(config, run_dir, executor)
    if seed_sets:
        out: dict[str, Any] = {"by_seed_set": {n: retrieval_by_class(run_dir, d, n) for n, d in sets.items()}}
    else:
        out = retrieval_by_class(run_dir, data)
    out.update(kept_after_dedupe=records["dedupe"]["out"], embed_dim=records["embed"].get("dim"),
               seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    return out


#: The demo's seed classes and the 7 it does not use.
DEMO_SEED_CLASSES = ("trouser", "bag", "ankle-boot")
HELD_OUT_CLASSES = tuple(c for c in CLASSES if c not in DEMO_SEED_CLASSES)


#: Run-directory entries of the ingest stage, and of embed (with the seed set's ingest and embed).
_INGEST_OUTPUTS = ("config.toml", "manifest", "occurrences", "rejects")
_EMBED_OUTPUTS = ("embeddings", "seeds")


def bootstrap_retrieval(curation_run: str, data: DemoData, models: dict[str, str], out_dir: str | os.PathLike,
                        executor: Any, *, held_out: Sequence[str] = HELD_OUT_CLASSES, n_seeds: int = 300,
                        num_cpus: int = 2, seed: int = 0,
                        dedupe_threshold: float | None = 1.0) -> dict[str, Any]:  # fmt: skip
    """The bootstrap loop's last step: retrieval precision of the demo's curation run (``curation_run``, built-in
    descriptor) and of each ``models`` export (name -> ``teacher.pth``) on the same pool, with the demo's seed
    set (``data``) and a held-out seed set of ``held_out`` classes (``n_seeds`` test images, written once).

    Each embedder works under ``out_dir/<name>`` on a copy of the ``curation_run`` outputs it does not change
    (ingest; for the descriptor also embed and the demo seed set), so only the rest reruns.

    ``dedupe_threshold``: the copy threshold of every embedder here (``None``: the recipe's 0.96). The default 1.0
    removes no near-duplicates, so every embedder retrieves from the same pool (all unique images): the recipe's
    0.96 is tuned for the descriptor (it removes 192 of 6192 demo images), while a freshly pretrained teacher
    scores most pool pairs above it (a 50-step teacher kept 63 images), which would measure dedupe, not retrieval.
    Returns ``{"descriptor": ..., name: ...}`` with :func:`curate_retrieval`'s figures per seed set (``demo``,
    ``held-out``). The descriptor's figures use the same metric as the models' (pairs whose pool image has the
    seed's class), so they can differ from the curation run's ``retrieval.precision`` (any seed class).
    """
    import shutil
    from dataclasses import replace

    out = Path(out_dir)
    seeds_dir = out / "seeds-held-out"
    if not seeds_dir.is_dir():
        write_seed_set(seeds_dir, held_out, n_seeds, seed + 1)
    held = replace(data, seed_sources=[str(seeds_dir)], seed_classes=list(held_out),
                   seeds=sum(1 for _ in seeds_dir.rglob("*.png")))  # fmt: skip
    sets = {"fashion": data, "held-out": held}  # "fashion": the curation run's seed set (reused as it is)
    result: dict[str, Any] = {}
    for name, spec in {"descriptor": "descriptor", **models}.items():
        run_dir = out / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        keep = _INGEST_OUTPUTS + (_EMBED_OUTPUTS if spec == "descriptor" else ())
        shutil.copytree(curation_run, run_dir, ignore=lambda d, names, keep=keep: [  # outputs the embedder keeps
            n for n in names if os.path.samefile(d, curation_run) and n not in keep])  # fmt: skip
        dd = [] if dedupe_threshold is None else [f"dedupe.threshold={dedupe_threshold}"]
        res = curate_retrieval(data, str(run_dir), executor, overrides=[*embedder_overrides(spec), *dd],
                               num_cpus=num_cpus, seed=seed, seed_sets=sets)  # fmt: skip
        res["by_seed_set"] = {"demo" if k == "fashion" else k: v for k, v in res["by_seed_set"].items()}
        result[name] = res
    return result


def format_summary(result: dict[str, Any]) -> str:
    """The demo figures as readable text."""
    f, d, r, n = result["funnel"], result["dedup"], result["retrieval"], result["nmi"]
    top = [k for k in n if k not in ("level1", "level1_clusters")][0]
    lines = [
        f"funnel: {f['source_files']} source files -> {f['unique_images']} unique images "
        f"(rejected {sum(f['rejected'].values())}: {f['rejected']}; {f['exact_duplicates_collapsed']} exact "
        f"duplicates collapsed) -> {f['embedded']} embedded -> {f['kept_after_dedupe']} kept after dedupe "
        f"({f['near_duplicates_removed']} near-duplicates removed) -> {f['selected']} selected "
        f"{f['selected_by_reason']} -> {f['sharded']} samples in {f['shards']} shards "
        f"({f['unlabelled_left_out']} unlabelled left out)",
        f"dedup vs injected copies: precision {d['precision']:.3f}, recall {d['recall']:.3f} "
        f"({d['true_positive_pairs']}/{d['injected_pairs']} injected pairs found, {d['predicted_pairs']} pairs "
        "predicted)",
        f"retrieval: {r['seeds']} seeds -> {r['retrieved']} pool images, precision {r['precision']:.3f} "
        f"(label in the seed classes); {r['collided']} images retrieved by several seeds",
        f"NMI vs labels: level 1 ({n['level1_clusters']} clusters) {n['level1']:.3f}, {top} {n[top]:.3f}; "
        f"cluster size max/min {result['balance']['size_ratio_before']} -> {result['balance']['size_ratio_after']}"
        " after balancing",
        f"shards: {result['shards']} ({result['shard_samples']} samples, {result['labelled_samples']} with cls)",
        f"report: {result['report']}",
        f"time: {result['seconds']['total']} s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m curation.demo OUT_DIR``: run the curation demo and print its figures."""
    p = argparse.ArgumentParser(prog="python -m curation.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--pool-size", type=int, default=6000)
    p.add_argument("--seeds", type=int, default=300)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE")
    args = p.parse_args(argv)
    for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_AUTH_MODE", "disabled"),
                       ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")):  # a private in-process Ray on this machine
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_curation_demo(args.out_dir, pool_size=args.pool_size, n_seeds=args.seeds, num_cpus=args.num_cpus,
                               overrides=args.overrides)  # fmt: skip
    print(format_summary(result))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
