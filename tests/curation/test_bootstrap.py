"""Curation with our own model: the raw-pixel embedder, a pretrain export as the embedder at its own input size,
and ``bench/curation_bootstrap.py`` end to end on a tiny Fashion-MNIST pool."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from curation.config import RunConfig
from curation.io.artifacts import load_embeddings
from curation.models import build_embedder
from curation.models.pixels import PixelPreprocess
from curation.ray import executor_for
from curation.stages import run_stages
from pretrain.utils.config import load_config

REPO = Path(__file__).resolve().parents[2]
PIXELS = ['embed.model="plugin"', 'embed.factory="curation.models.pixels:pixel_embedder"', "embed.image_size=28",
          'embed.resize="square"']  # fmt: skip


def _known(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (28, 28), dtype=np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_pixel_preprocess_is_pixels_over_255_normalised():
    arr = _known(0)
    v = PixelPreprocess(28)(Image.fromarray(arr).convert("RGB"))
    want = arr.astype(np.float32).ravel() / 255.0
    np.testing.assert_allclose(v, want / np.linalg.norm(want), rtol=1e-6)
    emb = build_embedder(load_config(RunConfig, None, PIXELS).embed)
    assert emb.dim == 784 and emb.embed(np.stack([v]))[0] == pytest.approx(v, rel=1e-6)
    assert PixelPreprocess(14)(Image.fromarray(arr)).shape == (196,)  # resized to the side asked for
    assert not PixelPreprocess(28)(Image.new("L", (28, 28))).any()  # black stays a zero vector
    with pytest.raises(ValueError, match="image_size"):
        PixelPreprocess(1024)


def test_pixel_embedder_through_the_embed_stage_without_ray(tmp_path):
    _pixel_stage(tmp_path, ['ray.address="none"'])


def test_pixel_embedder_through_the_embed_stage_on_ray(tmp_path, ray_session):
    _pixel_stage(tmp_path, ["ray.num_cpus=2"])


def _pixel_stage(tmp_path, ray_addr):
    arrs = {f"img{i}.png": _known(i) for i in range(5)}
    for name, arr in arrs.items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(_png(arr))
    cfg = load_config(RunConfig, None, [f'ingest.sources=["{tmp_path / "src"}"]', "ingest.rows_per_part=2",
                                        "ingest.decode.min_side=28", 'stages=["ingest", "embed"]', *PIXELS,
                                        *ray_addr])  # fmt: skip
    run_dir = str(tmp_path / "run")
    with executor_for(cfg.ray) as executor:
        rec = run_stages(cfg, run_dir, executor)
    assert rec["embed"]["dim"] == 784 and rec["embed"]["out"] == 5
    uids, mat, _ = load_embeddings(run_dir)
    manifest = {r["uid"]: Path(r["uri"]).name for r in pq.read_table(Path(run_dir) / "manifest").to_pylist()}
    for uid, row in zip(uids, mat):
        want = arrs[manifest[uid]].astype(np.float32).ravel() / 255.0
        np.testing.assert_allclose(row, want / np.linalg.norm(want), atol=1e-3)  # float16 storage


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_backbone_export_loads_as_embedder_at_its_own_size(tmp_path, kind):
    from pretrain.models import build_backbone, export_backbone

    torch.manual_seed(0)
    if kind == "vit":  # what the trainer's teacher.pth is: a vit_mini at 28 px, patch 4
        model = build_backbone("vit_mini", patch_size=4, img_size=28, init_values=0).eval()
        path = str(tmp_path / "export" / "teacher.pth")
    else:  # the SSL zoo's ResNet backbone.pth
        model = build_backbone("resnet_test").eval()
        path = str(tmp_path / "export" / "backbone.pth")
    Path(path).parent.mkdir()
    export_backbone(model, path)
    cfg = load_config(RunConfig, None, ['embed.model="backbone"', 'embed.name="auto"', f'embed.weights="{path}"',
                                        "embed.image_size=0", 'embed.resize="square"',
                                        'embed.device="cpu"'])  # fmt: skip
    emb = build_embedder(cfg.embed)
    size = 28 if kind == "vit" else 224
    assert emb.preprocess.size == size
    arr = _known(3)
    batch = np.stack([emb.preprocess(Image.fromarray(arr).convert("RGB"))])
    got = emb.embed(batch)
    # the same preprocessed input through build_backbone(None, weights=...) (the sidecar's architecture)
    ref = build_backbone(None, weights=path).eval()
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        out = ref((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    out = out["x_norm_clstoken"] if isinstance(out, dict) else out
    np.testing.assert_allclose(got, F.normalize(out, dim=1).numpy(), atol=1e-5)
    assert emb.dim == got.shape[1]
    with pytest.raises(ValueError, match="sidecar"):
        build_embedder(load_config(RunConfig, None, ['embed.model="backbone"', 'embed.name="auto"']).embed)
    with pytest.raises(ValueError, match="image_size"):
        load_config(RunConfig, None, ["embed.image_size=0"])  # 0 only means "the backbone's own size"


def _bench():
    spec = importlib.util.spec_from_file_location("curation_bootstrap", REPO / "bench" / "curation_bootstrap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_end_to_end_on_a_tiny_pool(tmp_path):
    from pretrain.models import build_backbone, export_backbone

    bench = _bench()
    torch.manual_seed(0)
    model = build_backbone("vit_mini", patch_size=4, img_size=28, init_values=0, depth=1)
    export_backbone(model, str(tmp_path / "r" / "export" / "teacher.pth"))
    rows = bench.run(str(tmp_path / "w"), models=[str(tmp_path / "r" / "export" / "teacher.pth")],
                     embedders=["pixels"], classes=["trouser", "sneaker"], pool=300, n_seeds=30,
                     address="none")  # fmt: skip
    assert [r["embedder"] for r in rows] == ["pixels", "r/teacher.pth"]
    for r in rows:
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["precision_any_seed_class"] <= 1.0
        assert set(r["per_class"]) == {"trouser", "sneaker"}
        assert all(0.0 <= p <= 1.0 for p in r["per_class"].values())
        assert r["pairs"] == 4 * r["seeds"] and 0 < r["retrieved"] <= r["pairs"] and r["seconds"] > 0
    # chance (a pool image of the seed's class) is ~0.1; raw pixels find trousers and sneakers far above it
    assert rows[0]["precision"] > 0.5
    table = bench.format_table(rows)
    assert "pixels" in table and "r/teacher.pth" in table and "sneaker" in table


def test_demo_bootstrap_step_reuses_the_curation_run(tmp_path):
    """``run_curation_demo(seed_classes=...)`` then the demo's last step: the same pool re-embedded with an export
    (ingest copied, not rerun) and retrieved with the demo's and a held-out seed set."""
    from curation.demo import bootstrap_retrieval, demo_data, run_curation_demo
    from curation.stages import LocalExecutor
    from pretrain.models import build_backbone, export_backbone

    res = run_curation_demo(tmp_path / "c", pool_size=300, n_seeds=30, address="none",
                            seed_classes=("trouser", "sneaker"), overrides=["cluster.target_size=100"])  # fmt: skip
    assert res["data"]["seed_classes"] == ["trouser", "sneaker"]
    assert {p.parent.name for p in (tmp_path / "c" / "data" / "seeds").rglob("*.png")} == {"trouser", "sneaker"}
    data = demo_data(tmp_path / "c" / "data", pool_size=300, n_seeds=30, seed=0, seed_classes=("trouser", "sneaker"))
    assert data.seed_classes == ["trouser", "sneaker"] and data.labels  # the run's data, reused
    torch.manual_seed(0)
    teacher = str(tmp_path / "r" / "export" / "teacher.pth")
    export_backbone(build_backbone("vit_mini", patch_size=4, img_size=28, init_values=0, depth=1), teacher)
    boot = bootstrap_retrieval(res["run_dir"], data, {"teacher": teacher}, tmp_path / "b", LocalExecutor(),
                               held_out=("sandal", "coat"), n_seeds=20)  # fmt: skip
    assert set(boot) == {"descriptor", "teacher"}
    for r in boot.values():
        assert set(r["by_seed_set"]) == {"demo", "held-out"}
        assert set(r["by_seed_set"]["held-out"]["per_class"]) == {"sandal", "coat"}
        for s in r["by_seed_set"].values():
            assert 0.0 <= s["precision"] <= 1.0 and s["retrieved"] > 0
    assert boot["teacher"]["embed_dim"] == 96 and boot["descriptor"]["embed_dim"] == 5632
    assert boot["descriptor"]["by_seed_set"]["demo"]["precision"] > 0.5  # trousers and sneakers: easy classes
    # the descriptor reused the curation run's embeddings (only retrieve reran); the teacher reused its ingest
    rec = json.loads((tmp_path / "b" / "descriptor" / "embeddings" / "_SUCCESS.json").read_text())
    assert rec == json.loads((Path(res["run_dir"]) / "embeddings" / "_SUCCESS.json").read_text())
    man = json.loads((tmp_path / "b" / "teacher" / "manifest" / "_SUCCESS.json").read_text())
    assert man == json.loads((Path(res["run_dir"]) / "manifest" / "_SUCCESS.json").read_text())
