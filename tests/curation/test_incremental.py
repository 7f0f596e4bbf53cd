"""Incremental runs (``--base``): A then B against A and B in one run, chains, a read-only base."""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import load_run_config
from curation.io.lineage import lineage
from curation.stages import LocalExecutor, run_stages
from curation.stages.copygraph import read_part

from .conftest import jpeg_bytes, make_copy, photos

STAGES = '["ingest", "embed", "dedupe", "cluster", "retrieve", "shard"]'
SETS = [f"stages={STAGES}", "ingest.rows_per_part=16", "dedupe.block_rows=16", "shard.samples_per_shard=3",
        "cluster.target_size=4",
        'cluster.levels=[{n_clusters=3, init="kmeans++", niter=20}, {n_clusters=2}]']  # fmt: skip


def _table(run: Path, sub: str):
    parts = sorted((run / sub).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def _corpus(root: Path) -> dict[str, dict[str, str]]:
    """Folders A, B, C of real photos. B: new photos, copies of A photos, exact duplicates of A files, copies
    among themselves, a corrupt file. C: a copy of a B photo, an exact duplicate of an A file, a new photo."""
    rng = random.Random(3)
    pics = photos(384)
    a, b, c = root / "A", root / "B", root / "C"
    for d in (a, b, c):
        d.mkdir(parents=True)
    truth: dict[str, str] = {}  # file -> source photo

    def put(path: Path, data: bytes, src: str) -> None:
        path.write_bytes(data)
        truth[str(path)] = src

    for name, im in pics[:8]:
        put(a / f"{name}.jpg", jpeg_bytes(im), name)
    for name, im in pics[:3]:
        put(a / f"{name}_c.jpg", make_copy(im, rng)[0], name)  # copies inside A
    for name, im in pics[8:14]:
        put(b / f"{name}.jpg", jpeg_bytes(im), name)
    for name, im in pics[8:10]:
        put(b / f"{name}_c.jpg", make_copy(im, rng)[0], name)  # copies inside B
    for name, im in pics[3:6]:
        put(b / f"{name}_copy_of_a.jpg", make_copy(im, rng)[0], name)  # new copies of base photos
    for name, _ in pics[6:8]:
        put(b / f"{name}_same_bytes.jpg", (a / f"{name}.jpg").read_bytes(), name)  # exact duplicates of A files
    (b / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "seeds").mkdir()
    (root / "seeds" / "seed.jpg").write_bytes(make_copy(pics[1][1], rng)[0])  # a photo of A
    name, im = pics[11]
    put(c / f"{name}_c2.jpg", make_copy(im, rng)[0], name)
    put(c / f"{pics[0][0]}_again.jpg", (a / f"{pics[0][0]}.jpg").read_bytes(), pics[0][0])
    name, im = pics[14]
    put(c / f"{name}.jpg", jpeg_bytes(im), name)
    return {"truth": truth}


def _run(run: Path, sources: list[Path], base: Path | None = None) -> dict:
    seeds = f'retrieve.seeds=[{{name = "s", sources = ["{run.parent / "pool" / "seeds"}"], n_per_seed = 2}}]'
    cfg = load_run_config("default", [*SETS, f"ingest.sources={json.dumps([str(s) for s in sources])}", seeds],
                          base=str(base) if base else None)  # fmt: skip
    return run_stages(cfg, str(run), LocalExecutor())


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _components(*tables) -> dict[str, int]:
    """Union of copy components over dedup tables and (new uid, base uid) match lists: uid -> root id."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for t in tables:
        pairs = t if isinstance(t, list) else [(r["uid"], f"c{id(t)}:{r['component']}") for r in t.to_pylist()]
        for u, v in pairs:
            parent[find(u)] = find(v)
    roots = {u: find(u) for u in list(parent) if not u.startswith("c")}
    ids = {r: i for i, r in enumerate(sorted(set(roots.values())))}
    return {u: ids[r] for u, r in roots.items()}


def _partition(comp: dict[str, int]) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for u, c in comp.items():
        groups.setdefault(c, set()).add(u)
    return {frozenset(g) for g in groups.values()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    data = _corpus(root / "pool")
    a, inc, both = root / "runA", root / "runA+B", root / "runAB"
    _run(a, [root / "pool" / "A"])
    before = _digest(a)
    recs = _run(inc, [root / "pool" / "B"], base=a)
    after = _digest(a)
    _run(both, [root / "pool" / "A", root / "pool" / "B"])
    return {"root": root, "a": a, "inc": inc, "both": both, "recs": recs, "truth": data["truth"],
            "base_untouched": before == after}  # fmt: skip


def test_increment_rejects_and_copy_pairs_equal_one_run(runs):
    a, inc, both = runs["a"], runs["inc"], runs["both"]
    assert runs["base_untouched"]  # the base run directory is read-only to an increment
    rej = {(r["uri"], r["reason"]) for r in _table(a, "rejects").to_pylist() + _table(inc, "rejects").to_pylist()}
    assert rej == {(r["uri"], r["reason"]) for r in _table(both, "rejects").to_pylist()} and rej
    # exact duplicates of base files are collapsed into the base uid, with the new URI recorded
    copies = _table(inc, "base_copies").to_pylist()
    base_uids = set(_table(a, "manifest")["uid"].to_pylist())
    same = [f for f in runs["truth"] if f.endswith("_same_bytes.jpg")]
    assert sorted(u for c in copies for u in c["uris"]) == sorted(same)
    assert all(c["uid"] in base_uids and c["base_run"] == str(a) for c in copies)
    assert not base_uids & set(_table(inc, "manifest")["uid"].to_pylist())  # never ingested or embedded again
    assert runs["recs"]["ingest"]["base_copies"] == len(same)
    assert lineage(str(inc), same[0])["status"] == "in_base"
    # the same copy groups: A's components + the increment's + its matches to base == the one run's components
    matches = [(r["uid"], r["ref_uid"]) for r in _table(inc, "decontam").to_pylist() if r["reference"] == "base"]
    incremental = _partition(_components(_table(a, "dedup"), _table(inc, "dedup"), matches))
    one_run = _partition(_components(_table(both, "dedup")))
    assert incremental == one_run
    assert runs["recs"]["dedupe"]["base_matched"] == len({u for u, _ in matches}) >= 3


def test_increment_never_drops_base_images_and_drops_new_copies(runs):
    a, inc, both, truth = runs["a"], runs["inc"], runs["both"], runs["truth"]
    uri = {r["uid"]: r["uri"] for t in (_table(a, "manifest"), _table(inc, "manifest")) for r in t.to_pylist()}
    kept_a = {r["uid"] for r in _table(a, "dedup").to_pylist() if r["keep"]}
    inc_rows = _table(inc, "dedup").to_pylist()
    for r in inc_rows:  # a new image whose photo the base holds is dropped; other new photos keep one image
        photo = truth[uri[r["uid"]]]
        in_base = any(truth[uri[u]] == photo for u in kept_a)
        assert not (r["keep"] and in_base), uri[r["uid"]]
    kept_inc = [r for r in inc_rows if r["keep"]]
    kept_both = [r for r in _table(both, "dedup").to_pylist() if r["keep"]]
    # one image per copy group either way; which one may differ (documented: base images win in an increment)
    assert len(kept_a) + len(kept_inc) == len(kept_both)


def test_increment_retrieves_new_images_for_the_same_seeds(runs):
    a, inc = runs["a"], runs["inc"]
    new = set(_table(inc, "manifest")["uid"].to_pylist())
    got = _table(inc, "retrieval").to_pylist()
    assert got and {r["uid"] for r in got} <= new and {r["seed_set"] for r in got} == {"s"}
    assert len({r["uid"] for r in got}) == 2  # n_per_seed new images for the one seed
    assert {r["seed_uid"] for r in got} == {r["seed_uid"] for r in _table(a, "retrieval").to_pylist()}


def test_increment_uses_base_centroids_and_continues_shards(runs):
    import webdataset as wds

    a, inc = runs["a"], runs["inc"]
    for lvl in ("level1/centroids.npy", "level2/centroids.npy", "level1/parent.npy"):
        assert (a / "clusters" / lvl).read_bytes() == (inc / "clusters" / lvl).read_bytes()
    cents = np.load(inc / "clusters" / "level1" / "centroids.npy")
    emb: dict[str, np.ndarray] = {}
    for part in sorted((inc / "embeddings").glob("part-*.parquet")):
        uids, x = read_part(str(part), cents.shape[1])
        emb.update(zip(uids, x))
    assign = _table(inc, "clusters/assign").to_pylist()
    assert assign and runs["recs"]["cluster"]["base_centroids"] == str(a)
    base_rec = json.loads((a / "clusters" / "_SUCCESS.json").read_text())  # balanced top-up: the base's proportion
    top_up = int(len(assign) * 4 / base_rec["out"] + 0.5)
    assert base_rec["balanced"] == 4 and runs["recs"]["cluster"]["balanced"] == top_up
    for r in assign:  # every new kept image sits in its nearest base centroid
        assert r["l1"] == int(np.argmax(cents @ emb[r["uid"]]))
    base_index = json.loads((a / "shards" / "index.json").read_text())
    index = json.loads((inc / "shards" / "index.json").read_text())
    n_base = len(base_index["shards"])
    names = [s["name"] for s in index["shards"]]
    assert names[:n_base] == [s["name"] for s in base_index["shards"]]
    assert names == [f"{index['prefix']}-{i:06d}.tar" for i in range(len(names))] and len(names) > n_base
    assert index["count"] == base_index["count"] + index["new_count"]
    for s in index["shards"][n_base:]:
        path = inc / "shards" / s["name"]
        assert s["run"] == str(inc) and hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
        with tarfile.open(path) as tar:
            assert tar.getnames()
        for sample in wds.WebDataset(str(path), shardshuffle=False):
            meta = json.loads(sample["json"])
            assert meta["increment"] == {"run": str(inc), "base": str(a)}


def test_chain_of_increments_and_guards(runs):
    root, a, inc, truth = runs["root"], runs["a"], runs["inc"], runs["truth"]
    inc2 = root / "runA+B+C"
    recs = _run(inc2, [root / "pool" / "C"], base=inc)
    copies = _table(inc2, "base_copies").to_pylist()
    assert [c["base_run"] for c in copies] == [str(a)]  # exact duplicate of an A file, two runs back
    uri = {r["uid"]: r["uri"] for r in _table(inc2, "manifest").to_pylist()}
    kept = {truth[uri[r["uid"]]] for r in _table(inc2, "dedup").to_pylist() if r["keep"]}
    assert kept == {truth[f] for f in uri.values() if not f.endswith("_c2.jpg")}  # the copy of a B photo dropped
    assert recs["dedupe"]["base_matched"] == 1
    index = json.loads((inc2 / "shards" / "index.json").read_text())
    assert [s["run"] for s in index["shards"]][-1] == str(inc2) and str(a) in {s["run"] for s in index["shards"]}
    with pytest.raises(ValueError, match="read-only"):
        _run(inc, [root / "pool" / "C"], base=inc)
    with pytest.raises(ValueError, match="embed settings differ"):
        cfg = load_run_config("default", [*SETS, f'ingest.sources=["{root / "pool" / "C"}"]', "embed.dtype=float32"],
                              base=str(a))  # fmt: skip
        run_stages(cfg, str(root / "bad"), LocalExecutor())


def test_cli_base_option(tmp_path, capsys):
    """``python -m curation run RECIPE --out NEW --base BASE`` as documented (no Ray: ``--address none``)."""
    from curation.cli import main

    pics = photos(256)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name, im in pics[:3]:
        (tmp_path / "a" / f"{name}.jpg").write_bytes(jpeg_bytes(im))
    (tmp_path / "b" / "same.jpg").write_bytes((tmp_path / "a" / f"{pics[0][0]}.jpg").read_bytes())
    (tmp_path / "b" / "new.jpg").write_bytes(jpeg_bytes(pics[5][1]))
    args = ["--address", "none", "--set", "ingest.rows_per_part=4"]
    assert main(["run", "default", "--out", str(tmp_path / "r1"), *args, "--set",
                 f'ingest.sources=["{tmp_path / "a"}"]']) == 0  # fmt: skip
    assert main(["run", "default", "--out", str(tmp_path / "r2"), "--base", str(tmp_path / "r1"), *args, "--set",
                 f'ingest.sources=["{tmp_path / "b"}"]']) == 0  # fmt: skip
    out = capsys.readouterr().out
    summary = json.JSONDecoder().raw_decode(out, out.rindex("\n{\n") + 1)[0]  # the second run's summary
    assert summary["ingest"]["base_copies"] == 1 and summary["ingest"]["out"] == 1
    assert 'base = "' in (tmp_path / "r2" / "config.toml").read_text()
    assert main(["run", "default", "--out", str(tmp_path / "r1"), "--base", str(tmp_path / "r1"), *args]) == 2
