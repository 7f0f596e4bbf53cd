"""Dataset card (``report/DATASET_CARD.md`` + ``dataset_card.json``): a small real run through the report stage,
and every number of the card checked against the run's own outputs."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import RunConfig
from curation.io.fs import atomic_write_bytes, join, read_json, read_parquet
from curation.report.card import card_markdown
from curation.stages import LocalExecutor, run_stages
from curation.stages.card_sources import source_matcher
from curation.stages.report_card import _chain, resolved_config_sha256
from pretrain.utils.config import dump_toml, load_config, to_dict

from .conftest import jpeg_bytes, make_copy, photos, write_copy_corpus


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    pool = root / "pool"
    truth = write_copy_corpus(pool, originals=9, copies=2, seed=3)
    (pool / "broken.jpg").write_bytes(b"not an image")
    astronaut = (pool / "astronaut.jpg").read_bytes()
    (pool / "astronaut_again.jpg").write_bytes(astronaut)  # exact duplicate inside the directory source
    extra = {f"x/{name}.jpg": jpeg_bytes(im) for name, im in photos(256)[9:12]}
    extra["x/astronaut.jpg"] = astronaut  # exact duplicate across sources
    extra["x/meta.json"] = b"{}"  # side file: skipped, not read
    _tar(root / "extra.tar", extra)
    rng = random.Random(5)
    (root / "refs").mkdir()
    (root / "refs" / "r.jpg").write_bytes(make_copy(dict(photos())["rocket"], rng)[0])  # photo 3: no pool copies
    (root / "seeds").mkdir()
    for i in (0, 4):
        (root / "seeds" / f"s{i}.jpg").write_bytes(make_copy(photos()[i][1], rng)[0])
    overrides = [
        f'ingest.sources=["{pool}", "{root / "extra.tar"}"]', "ingest.files_per_part=8", "ingest.rows_per_part=8",
        "embed.batch_size=8", 'stages=["ingest", "embed", "dedupe", "cluster", "retrieve", "shard", "report"]',
        f'dedupe.references=[{{name="eval", sources=["{root / "refs"}"]}}]',
        "cluster.levels=[{n_clusters=3}]", "cluster.target_size=5", "retrieve.rows_per_part=4",
        f'retrieve.seeds=[{{name="s", sources=["{root / "seeds"}"], n_per_seed=2}}]', "shard.samples_per_shard=3",
        "report.images_per_cluster=2", "report.clusters_shown=1", "report.retrieval_seeds=1", "report.thumb=32",
        "report.duplicate_groups=2",
    ]  # fmt: skip
    cfg = load_config(RunConfig, "curation/recipes/default.toml", overrides)
    out = str(root / "run")
    atomic_write_bytes(join(out, "config.toml"), dump_toml(to_dict(cfg)).encode())  # as python -m curation does
    records = run_stages(cfg, out, LocalExecutor())
    card = json.loads(Path(out, "report", "dataset_card.json").read_text())
    return SimpleNamespace(root=root, out=out, cfg=cfg, records=records, card=card, truth=truth,
                           md=Path(out, "report", "DATASET_CARD.md").read_text())  # fmt: skip


def _rec(run, d: str) -> dict:
    return read_json(f"{run.out}/{d}/_SUCCESS.json")


def test_report_stage_writes_both_files(run):
    assert run.records["report"]["card"] == ["DATASET_CARD.md", "dataset_card.json"]
    assert run.md == card_markdown(run.card)  # the Markdown is rendered from the JSON twin
    for heading in ("## Run", "## Sources", "## Funnel", "## Copy detection (dedupe)", "## Decontamination",
                    "## Cluster balance", "## Seed sets and retrieval", "## Shards", "## Provenance"):  # fmt: skip
        assert f"\n{heading}\n" in run.md
    assert "none (full run)" in run.md and run.card["increment"]["chain"] == []


def test_sources_add_up_to_ingest(run):
    ing, ded, sel = _rec(run, "manifest"), _rec(run, "dedup"), _rec(run, "selection")
    rows = {r["source"]: r for r in run.card["sources"]}
    pool, tar = str(run.root / "pool"), str(run.root / "extra.tar")
    assert list(rows) == [pool, tar]  # every occurrence attributed, in source order
    assert rows[pool]["kind"] == "directory" and rows[tar]["kind"] == "tar shard"
    assert rows[pool]["read"] == len(run.truth) + 2 and rows[tar]["read"] == 4  # the .json side file is skipped
    assert (rows[tar]["tar_members"], rows[tar]["tars"], rows[pool]["tar_members"]) == (4, 1, 0)
    assert sum(r["read"] for r in rows.values()) == ing["in"]
    rejected = Counter()
    for r in rows.values():
        rejected.update(r["rejected"])
        assert r["accepted"] == r["read"] - sum(r["rejected"].values())
        assert r["images"] == r["not embedded"] + r["duplicate"] + r["contaminated"] + r["kept"]
    assert dict(rejected) == ing["rejected"] and set(rows[pool]["rejected"]) == {"not_image"}
    # the astronaut is in both sources: counted under each, once in the manifest
    assert sum(r["images"] for r in rows.values()) == ing["out"] + 1
    assert rows[tar]["images"] == 4 and rows[pool]["images"] == len(run.truth)
    assert sum(r["kept"] for r in rows.values()) >= ded["out"] and sum(r["contaminated"] for r in rows.values()) == 1
    assert sel["out"] <= sum(r["selected"] for r in rows.values()) <= sel["out"] + 1
    assert run.card["skipped_non_image"] == ing["skipped_non_image"] == 1


def test_funnel_numbers_add_up(run):
    steps = run.card["funnel"]
    assert [s["stage"] for s in steps] == ["ingest", "embed", "dedupe", "retrieve", "shard"]
    for s in steps:
        assert s["in"] == s["out"] + sum(s["dropped"].values()) and "unaccounted" not in s["dropped"]
    for a, b in zip(steps, steps[1:]):
        assert a["out"] == b["in"]
    ing, ded, sel, sha = (_rec(run, d) for d in ("manifest", "dedup", "selection", "shards"))
    assert steps[0]["in"] == ing["in"] and steps[0]["out"] == ing["out"]
    assert steps[0]["dropped"] == {"rejected: not_image": 1, "exact duplicate (same bytes)": 2}
    assert steps[2]["dropped"] == {k: v for k, v in ded["rejected"].items() if v}
    assert steps[3]["selected_because"] == sel["reasons"] and steps[-1]["out"] == sha["out"]
    assert "Every row: in = out + dropped." in run.md
    assert "| rejected 1 (not_image 1), exact duplicate (same bytes) 2 |" in run.md


def test_dedupe_and_decontamination_match_the_outputs(run):
    ded = _rec(run, "dedup")
    d = run.card["dedupe"]
    assert d["results"]["candidates"] == ded["candidates"] and d["results"]["verified"] == ded["verified"]
    assert d["settings"]["candidate threshold"] == run.cfg.dedupe.candidate_threshold
    assert len(d["largest_components"]) == len(ded["largest_components"]) >= 1
    where = {}
    for i in range(_rec(run, "manifest")["manifest_parts"]):
        t = read_parquet(f"{run.out}/manifest/part-{i:05d}.parquet", columns=["uid", "uri"])
        where.update(zip(t["uid"].to_pylist(), t["uri"].to_pylist()))
    for c, r in zip(d["largest_components"], ded["largest_components"]):
        assert (c["size"], c["score"], c["weakest_uid"]) == (r["size"], r["weakest_score"], r["weakest_uid"])
        assert c["weakest_uri"] == where[r["weakest_uid"]] and c["weakest_uri"] in run.md
    rows = pa.concat_tables([pq.read_table(f"{run.out}/decontam/part-{i:05d}.parquet")
                             for i in range(ded["decontam_parts"])])  # fmt: skip
    dc = run.card["decontamination"]
    assert [r["name"] for r in dc["reference_sets"]] == ["eval"]
    ref = dc["reference_sets"][0]
    assert ref["matches"] == rows.num_rows == ded["decontam_matches"] >= 1 and ref["images"] == 1
    assert ref["pool_images_matched"] == len(set(rows["uid"].to_pylist()))
    assert dc["contaminated_dropped"] == ded["rejected"]["contaminated"] == 1


def test_clusters_and_retrieval(run):
    c, sizes = run.card["clusters"], read_json(f"{run.out}/clusters/sizes.json")
    assert c["levels"] == [3] and c["balanced_sample"] == 5
    assert c["level1_before"]["images"] == sum(sizes["level1_before"]) == _rec(run, "dedup")["out"]
    assert c["level1_after"]["images"] == sum(sizes["level1_after"]) == 5
    assert c["level1_before"]["largest"] == max(sizes["level1_before"])
    r, sel = run.card["retrieval"], _rec(run, "selection")
    assert [s["name"] for s in r["seed_sets"]] == ["s"]
    s = r["seed_sets"][0]
    assert (s["seed_images"], s["pairs"], s["retrieved"]) == (2, sel["seed_sets"]["s"]["pairs"],
                                                              sel["seed_sets"]["s"]["retrieved"])  # fmt: skip
    assert r["selected"] == sel["out"] and r["reasons"] == sel["reasons"]


def test_shards_equal_the_files_on_disk(run):
    sh = run.card["shards"]
    on_disk = sorted(p.name for p in Path(run.out, "shards").glob("*.tar"))
    assert [s["name"] for s in sh["shards"]] == on_disk and len(on_disk) >= 2
    for s in sh["shards"]:
        data = Path(run.out, "shards", s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
        assert s["sha256"] in run.md
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            assert s["count"] == len({m.name.split(".")[0] for m in tf.getmembers()})
    assert sh["count"] == sum(s["count"] for s in sh["shards"]) == _rec(run, "shards")["out"]


def test_run_provenance(run):
    r = run.card["run"]
    assert r["config_sha256"] == hashlib.sha256(Path(run.out, "config.toml").read_bytes()).hexdigest()
    assert r["config_toml_sha256"] == r["config_sha256"] == resolved_config_sha256(run.cfg)
    for stage, d in (("ingest", "manifest"), ("dedupe", "dedup"), ("shard", "shards")):
        assert r["stages_ran"][stage]["config_hash"] == _rec(run, d)["config_hash"]
        assert _rec(run, d)["code_version"] in r["code_versions"]
    assert f"sha256 `{r['config_sha256']}` (= `config.toml`)" in run.md


def test_source_matcher_follows_ingest_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    m = source_matcher([f"{tmp_path}/d/sub", f"{tmp_path}/d", f"{tmp_path}/t-{{0..1}}.tar", f"{tmp_path}/g/*.jpg",
                        f"{tmp_path}/uris.parquet"])  # fmt: skip
    assert m.kinds == ["directory", "directory", "tar shards", "glob", "URI list"]
    assert m.match(f"{tmp_path}/d/sub/a.jpg") == 0 and m.match(f"{tmp_path}/d/b.jpg") == 1
    assert m.match_uri(f"{tmp_path}/t-1.tar#x/a.jpg") == 2 and m.match(f"{tmp_path}/g/a.jpg") == 3
    assert m.match(f"{tmp_path}/g/h/a.jpg") == 4 and m.match("/elsewhere/a.jpg") == 4  # the URI list's
    two = source_matcher([f"{tmp_path}/a.parquet", f"{tmp_path}/b.parquet"])
    assert two.match("/x.jpg") == 2 and two.labels[2].startswith("URI lists: ")


def test_increment_chain_from_config_toml(tmp_path):
    def fake_run(name: str, base: str) -> str:
        run = tmp_path / name
        (run / "manifest").mkdir(parents=True)
        (run / "config.toml").write_text(f'name = "{name}"\n' + (f'base = "{base}"\n' if base else ""))
        (run / "manifest" / "_SUCCESS.json").write_text(json.dumps({"out": 7, "code_version": "abc"}))
        return str(run)

    root = fake_run("root", "")
    mid = fake_run("mid", root)
    chain = _chain(SimpleNamespace(base=mid), str(tmp_path / "new"))
    assert [(b["run_dir"], b["name"], b["images"]) for b in chain] == [(root, "root", 7), (mid, "mid", 7)]
    assert _chain(SimpleNamespace(), str(tmp_path / "new")) == []  # configs without a base field: a full run
    card = {"run": {"name": "x", "run_dir": "r", "seed": 0, "stages": [], "config_sha256": "c",
                    "config_toml_sha256": None, "code_versions": ["v"], "report_code_version": "v", "stages_ran": {}},
            "increment": {"base": mid, "chain": chain}, "funnel": []}  # fmt: skip
    md = card_markdown(card)
    assert f"`{root}` -> `{mid}` -> this run" in md and "Base runs, oldest first" in md


def test_increment_card_names_its_base_and_lists_every_shard(tmp_path):
    pics, rng = photos(256), random.Random(7)
    for d in ("A", "B", "seeds"):
        (tmp_path / d).mkdir()
    for name, im in pics[:6]:
        (tmp_path / "A" / f"{name}.jpg").write_bytes(jpeg_bytes(im))
    for name, im in pics[6:10]:
        (tmp_path / "B" / f"{name}.jpg").write_bytes(jpeg_bytes(im))
    (tmp_path / "B" / "same_bytes.jpg").write_bytes((tmp_path / "A" / f"{pics[1][0]}.jpg").read_bytes())
    (tmp_path / "B" / "copy_of_a.jpg").write_bytes(make_copy(pics[2][1], rng)[0])
    (tmp_path / "seeds" / "s.jpg").write_bytes(make_copy(pics[7][1], rng)[0])
    common = ["ingest.rows_per_part=4", "shard.samples_per_shard=2", "cluster.levels=[{n_clusters=2}]",
              f'retrieve.seeds=[{{name="s", sources=["{tmp_path / "seeds"}"], n_per_seed=2}}]',
              "cluster.target_size=3", "report.duplicate_groups=0", "report.thumb=32", "report.images_per_cluster=2"]
    a, b = str(tmp_path / "runA"), str(tmp_path / "runB")
    base_stages = 'stages=["ingest", "embed", "dedupe", "cluster", "retrieve", "shard"]'
    cfg_a = load_config(RunConfig, "curation/recipes/default.toml",
                        [*common, base_stages, f'ingest.sources=["{tmp_path / "A"}"]'])  # fmt: skip
    run_stages(cfg_a, a, LocalExecutor())
    cfg_b = load_config(RunConfig, "curation/recipes/default.toml",
                        [*common, base_stages[:-1] + ', "report"]', f'ingest.sources=["{tmp_path / "B"}"]',
                         f'base="{a}"'])  # fmt: skip
    run_stages(cfg_b, b, LocalExecutor())
    card = json.loads(Path(b, "report", "dataset_card.json").read_text())
    md = Path(b, "report", "DATASET_CARD.md").read_text()
    assert [(x["run_dir"], x["name"], x["images"]) for x in card["increment"]["chain"]] == [
        (a, "default", read_json(f"{a}/manifest/_SUCCESS.json")["out"])]  # fmt: skip
    assert f"`{a}` -> this run" in md and "none (full run)" not in md
    ingest = card["funnel"][0]
    assert ingest["dropped"]["already in a base run (same bytes)"] == 1
    assert ingest["in"] == ingest["out"] + sum(ingest["dropped"].values())
    refs = card["decontamination"]["reference_sets"]
    assert [(r["name"], r.get("base_runs"), r["sources"]) for r in refs] == [("base", True, [a])]
    matches = pa.concat_tables([pq.read_table(p) for p in sorted(Path(b, "decontam").glob("part-*.parquet"))])
    assert refs[0]["matches"] == Counter(matches["reference"].to_pylist())["base"] >= 1
    index = read_json(f"{b}/shards/index.json")
    sh = card["shards"]
    on_disk = sorted(p.name for p in Path(a, "shards").glob("*.tar")) + sorted(
        p.name for p in Path(b, "shards").glob("*.tar"))  # fmt: skip
    assert [s["name"] for s in sh["shards"]] == on_disk and sh["new_shards"] == index["new_shards"] >= 1
    for s in sh["shards"]:
        data = Path(s["run"], "shards", s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
    assert f"{sh['new_shards']} shards and {sh['new_count']} samples are new in this run" in md


def test_shards_without_a_recorded_sha256_are_hashed_by_tasks(run, tmp_path):
    from curation.stages.report_card import _shards

    index = read_json(f"{run.out}/shards/index.json")
    (tmp_path / "shards").mkdir()
    for s in index["shards"]:
        (tmp_path / "shards" / s["name"]).write_bytes(Path(run.out, "shards", s["name"]).read_bytes())
    index["shards"] = [{k: v for k, v in s.items() if k != "sha256"} for s in index["shards"]]
    (tmp_path / "shards" / "index.json").write_text(json.dumps(index))
    got = _shards(LocalExecutor(), run.cfg, str(tmp_path), {"out": index["count"]})
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in run.card["shards"]["shards"]]
