"""Shard stage at scale: the two-level shuffle (uid-range groups of at most ``shard.group_rows`` samples),
deterministic and exactly-once with any number of groups, resumable at every step, bounded per task, and the
balanced sample in one part or several."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation.config import RunConfig
from curation.io.fs import read_json, read_parquet, write_json, write_parquet
from curation.stages import LocalExecutor, run_stages
from curation.stages.shard import ShardStage
from curation.stages.shard_plan import fine_bucket, parquet_rows
from pretrain.utils.config import load_config

from .conftest import DyingExecutor, Killed, jpeg_bytes, photos

CLASSES = ["animals", "objects", "scenes"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A finished ingest -> embed -> dedupe -> cluster run over 54 labelled images (27 photos, each also rotated
    with its colour channels swapped) in about 7 manifest parts."""
    root = tmp_path_factory.mktemp("groups")
    src = root / "src"
    for i, (name, im) in enumerate(photos(96)):
        swapped = Image.merge("RGB", im.transpose(Image.Transpose.ROTATE_90).split()[::-1])  # another image
        for v, img in enumerate((im, swapped)):
            d = src / CLASSES[(i + v) % 3]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{name}-{v}.jpg").write_bytes(jpeg_bytes(img))
    run = root / "run"
    records = run_stages(_config(src), str(run), LocalExecutor(), ["ingest", "embed", "dedupe", "cluster"])
    assert records["dedupe"]["out"] >= 30 and records["ingest"]["manifest_parts"] >= 6
    return src, run, records["dedupe"]["out"]


def _config(src, *overrides: str) -> RunConfig:
    return load_config(
        RunConfig,
        "curation/recipes/default.toml",
        [f'ingest.sources=["{src}"]', "ingest.files_per_part=8", "ingest.rows_per_part=8", "embed.batch_size=8",
         "dedupe.threshold=0.95", "cluster.levels=[{n_clusters=4}, {n_clusters=2}]", "cluster.target_size=30",
         "shard.samples_per_shard=4", 'shard.label_from="parent_dir"', f"shard.classes={json.dumps(CLASSES)}",
         'shard.selection="dedup"', *overrides],
    )  # fmt: skip


def _fresh(pool, tmp_path, name: str) -> str:
    dst = tmp_path / name
    shutil.copytree(pool[1], dst)
    return str(dst)


def _tars(run: str) -> dict[str, bytes]:
    d = os.path.join(run, "shards")
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if n.endswith(".tar")}


def _keys(tars: dict[str, bytes]) -> list[str]:
    out = []
    for data in tars.values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            out += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".json")]
    return out


def _kept(run: str) -> set[str]:
    kept = set()
    for i in range(read_json(f"{run}/dedup/_SUCCESS.json")["dedup_parts"]):
        t = read_parquet(f"{run}/dedup/part-{i:05d}.parquet", columns=["uid", "keep"])
        kept |= {u for u, k in zip(t["uid"].to_pylist(), t["keep"].to_pylist()) if k}
    return kept


def test_groups_are_deterministic_exactly_once_and_numbered_group_by_group(pool, tmp_path):
    src, _, kept = pool
    runs = {name: _fresh(pool, tmp_path, name) for name in ("a", "b", "one")}
    for name in ("a", "b"):
        rec = run_stages(_config(src, "shard.group_rows=9"), runs[name], LocalExecutor(), ["shard"])["shard"]
        assert rec["groups"] > 2 and rec["in"] == rec["out"] == kept
    one = run_stages(_config(src), runs["one"], LocalExecutor(), ["shard"])["shard"]
    assert one["groups"] == 1
    a, b = _tars(runs["a"]), _tars(runs["b"])
    assert a == b  # same inputs, seed and group_rows: byte-identical
    assert (
        read_json(f"{runs['a']}/shards/index.json")["shards"] == read_json(f"{runs['b']}/shards/index.json")["shards"]
    )
    keys = _keys(a)
    assert len(keys) == len(set(keys)) == kept and set(keys) == _kept(runs["a"])  # every sample exactly once
    assert sorted(keys) == sorted(_keys(_tars(runs["one"]))) and keys != _keys(_tars(runs["one"]))
    plan = next(read_json(f"{runs['a']}/_work/shard/{n}") for n in os.listdir(f"{runs['a']}/_work/shard")
                if n.startswith("plan-"))  # fmt: skip
    assert sum(plan["shards"]) == len(a) and len(plan["groups"]) == rec["groups"]
    # shards follow the groups: the group of each sample never decreases along the shard order
    group_of_bucket = np.zeros(plan["fine_buckets"], np.int64)
    for g, (f0, f1) in enumerate(plan["groups"]):
        group_of_bucket[f0:f1] = g
    groups = group_of_bucket[fine_bucket(keys, plan["fine_buckets"])]
    assert (np.diff(groups) >= 0).all() and groups[-1] == len(plan["groups"]) - 1
    # a group is shuffled inside: not in uid order
    assert any(keys[i] > keys[i + 1] for i in range(len(keys) - 1) if groups[i] == groups[i + 1])


def test_unshuffled_groups_keep_global_uid_order(pool, tmp_path):
    src = pool[0]
    run = _fresh(pool, tmp_path, "sorted")
    rec = run_stages(_config(src, "shard.group_rows=9", "shard.shuffle=false"), run, LocalExecutor(), ["shard"])
    keys = _keys(_tars(run))
    assert rec["shard"]["groups"] > 2 and keys == sorted(keys)




@pytest.mark.parametrize("step,after", [("lineage", 1), ("join", 3), ("plan", 2), ("shard", 3)])
def test_killed_grouped_plan_resumes_to_identical_shards(pool, tmp_path, step, after):
    src = pool[0]
    cfg = _config(src, "shard.group_rows=9")
    ref, run = _fresh(pool, tmp_path, "ref"), _fresh(pool, tmp_path, "run")
    run_stages(cfg, ref, LocalExecutor(), ["shard"])
    with pytest.raises(Killed):
        run_stages(cfg, run, DyingExecutor(step, after), ["shard"])
    assert not os.path.exists(f"{run}/shards/_SUCCESS.json")
    rec = run_stages(cfg, run, LocalExecutor(), ["shard"])["shard"]
    assert rec["parts_skipped"] >= after
    assert _tars(run) == _tars(ref)
    assert read_json(f"{run}/shards/index.json")["shards"] == read_json(f"{ref}/shards/index.json")["shards"]
    assert not os.path.exists(f"{run}/_work/shard/data/lineage")  # shuffle data dropped once the plan is frozen


def test_every_task_holds_at_most_its_bound(pool, tmp_path):
    """The memory contract, counted in rows: map tasks a batch of at most ``group_rows`` input rows (a larger
    part alone), join tasks one fine bucket, plan tasks a group of at most ``group_rows``, shard tasks a shard."""
    src = pool[0]
    part_rows = max(parquet_rows([str(p) for p in sorted((pool[1] / "manifest").glob("part-*.parquet"))]))
    for group_rows in (9, 20):
        run = _fresh(pool, tmp_path, f"bound{group_rows}")
        stage = ShardStage(_config(src, f"shard.group_rows={group_rows}"), run)
        rec = stage.execute(LocalExecutor())
        assert rec["groups"] > 1
        held = {step: [int(m["held"]) for m in stage.store.done(step, stage.config_hash).values()]
                for step in ("select", "lineage", "join", "plan", "shard")}  # fmt: skip
        assert all(held.values()), held
        assert max(held["select"] + held["lineage"]) <= max(group_rows, part_rows), held
        assert max(held["plan"]) <= group_rows, held
        # a fine bucket: about group_rows / 4 manifest rows and the selected ones among them, up to the Poisson
        # deviation of a uid range (a few square roots; negligible at real sizes)
        assert max(held["join"]) <= group_rows / 2 + 4 * group_rows**0.5, held
        assert max(held["shard"]) <= 4
        assert len(held["select"]) > 1 and len(held["join"]) > len(held["plan"]) > 1


def _rewrite_balanced(run: str, n_parts: int | None) -> None:
    """Lay the balanced sample out again in ``n_parts`` parts (None: part 0 only, no count in the record)."""
    rec = read_json(f"{run}/clusters/_SUCCESS.json")
    old = int(rec.get("balanced_parts", 1))
    table = pa.concat_tables([read_parquet(f"{run}/clusters/balanced/part-{i:05d}.parquet") for i in range(old)])
    for i in range(old):
        os.remove(f"{run}/clusters/balanced/part-{i:05d}.parquet")
    pieces = np.array_split(np.arange(table.num_rows), n_parts or 1)
    for i, idx in enumerate(pieces):
        write_parquet(f"{run}/clusters/balanced/part-{i:05d}.parquet", table.take(pa.array(idx, pa.int64())))
    rec.pop("balanced_parts", None)
    if n_parts is not None:
        rec["balanced_parts"] = n_parts
    write_json(f"{run}/clusters/_SUCCESS.json", rec)


def test_balanced_sample_in_one_part_or_several(pool, tmp_path):
    src = pool[0]
    out = {}
    for layout in (None, 3):
        run = _fresh(pool, tmp_path, f"balanced{layout}")
        _rewrite_balanced(run, layout)
        rec = run_stages(_config(src, 'shard.selection="balanced"', "shard.group_rows=12"), run, LocalExecutor(),
                         ["shard"])["shard"]  # fmt: skip
        assert rec["selection"] == "balanced" and rec["out"] == read_json(f"{run}/clusters/_SUCCESS.json")["balanced"]
        out[layout] = _tars(run)
    assert out[None] == out[3]
    for data in out[3].values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    assert meta["selection"]["reason"] == "balanced" and set(meta["clusters"]) == {"l1", "l2"}
                    assert meta["component"] is not None
