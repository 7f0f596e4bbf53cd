"""Embed stage and models without Ray: the built-in descriptor's invariances, TorchScript and pretrain
backbones (output checked against a direct forward), preprocessing, tar read-back, decode processes, errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from curation.config import RunConfig
from curation.decode import DecodeLimits, load_rgb
from curation.io.artifacts import load_embeddings
from curation.models import build_embedder
from curation.models.descriptor import DescriptorPreprocess, descriptor_dim
from curation.models.torch_embedder import ResizePreprocess
from curation.stages import EmbedStage, IngestStage, LocalExecutor
from pretrain.utils.config import load_config

from .conftest import jpeg_bytes, photos


def _cfg(sources, *extra):
    return load_config(RunConfig, None, [f'ingest.sources=["{sources}"]', "ingest.rows_per_part=3", *extra])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    for name, im in photos()[:5]:
        small = im.copy()
        small.thumbnail((160, 160))
        (root / f"{name}.jpg").write_bytes(jpeg_bytes(small))
    return root


def _run(cfg, run_dir):
    IngestStage(cfg, run_dir).execute(LocalExecutor())
    rec = EmbedStage(cfg, run_dir).execute(LocalExecutor())
    return rec, load_embeddings(run_dir)


def test_descriptor_invariances():
    pre = DescriptorPreprocess()
    im = photos()[0][1]
    base = pre(im)
    assert base.shape == (descriptor_dim(),) == (5632,) and abs(np.linalg.norm(base) - 1) < 1e-5
    assert float(base @ pre(ImageOps.mirror(im))) > 0.9999  # exactly flip-invariant
    assert float(base @ pre(ImageOps.grayscale(im).convert("RGB"))) > 0.95
    assert float(base @ pre(ImageEnhance.Brightness(im).enhance(1.2))) > 0.95
    assert float(base @ pre(im.resize((im.width // 2, im.height // 2)))) > 0.9
    others = [float(base @ pre(other)) for _, other in photos()[1:]]
    assert max(others) < 0.372


def test_descriptor_embed_stage_writes_normalised_float16(images, tmp_path):
    rec, (uids, mat, sizes) = _run(_cfg(images), str(tmp_path / "run"))
    assert rec["out"] == 5 and rec["dim"] == 5632 and len(sizes) == 2 and sum(sizes) == 5
    table = pq.read_table(tmp_path / "run" / "embeddings" / "part-00000.parquet")
    emb_type = table.schema.field("emb").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == 5632 and emb_type.value_type == pa.float16()
    np.testing.assert_allclose(np.linalg.norm(mat, axis=1), 1.0, atol=2e-3)
    # float32 and 2 decode processes give the same vectors
    rec32, (uids32, mat32, _) = _run(_cfg(images, 'embed.dtype="float32"', "embed.cpus_per_actor=2"),
                                     str(tmp_path / "run32"))  # fmt: skip
    assert uids32 == uids and np.abs(mat32 - mat).max() < 2e-3


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


def _expected(model, paths, size, mode):
    pre = ResizePreprocess(size, mode)
    limits = DecodeLimits()  # decode exactly as the stage does (JPEG draft at the model size)
    batch = np.stack([pre(load_rgb(Path(p).read_bytes(), limits, draft_size=pre.draft_size)) for p in paths])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(x)
    return F.normalize(out if torch.is_tensor(out) else out["x_norm_clstoken"], dim=1).numpy()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_model_from_fsspec_url(images, tmp_path):
    torch.manual_seed(0)
    scripted = torch.jit.script(_TinyNet().eval())
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    fsspec.filesystem("memory").pipe("/models/tiny.pt", buf.getvalue())
    cfg = _cfg(images, 'embed.model="torchscript"', 'embed.weights="memory://models/tiny.pt"', "embed.image_size=32",
               'embed.resize="square"', "embed.batch_size=2")  # fmt: skip
    rec, (uids, mat, _) = _run(cfg, str(tmp_path / "run"))
    assert rec["dim"] == 6 and mat.shape == (5, 6)
    manifest = {r["uid"]: r["uri"] for r in pq.read_table(tmp_path / "run" / "manifest").to_pylist()}
    want = _expected(scripted, [manifest[u] for u in uids], 32, "square")
    np.testing.assert_allclose(mat, want, atol=3e-3)


def test_pretrain_backbone_with_exported_weights(images, tmp_path):
    from pretrain.models import build_backbone, export_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_test").eval()
    export_backbone(model, str(tmp_path / "vit_test.pth"))
    cfg = _cfg(images, 'embed.model="backbone"', 'embed.name="vit_test"', f'embed.weights="{tmp_path}/vit_test.pth"',
               "embed.image_size=56", "embed.batch_size=4")  # fmt: skip
    rec, (uids, mat, _) = _run(cfg, str(tmp_path / "run"))
    assert rec["dim"] == model.embed_dim == mat.shape[1]
    manifest = {r["uid"]: r["uri"] for r in pq.read_table(tmp_path / "run" / "manifest").to_pylist()}
    want = _expected(model, [manifest[u] for u in uids], 56, "short_side_crop")
    np.testing.assert_allclose(mat, want, atol=3e-3)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_embedder(load_config(RunConfig, None, ['embed.model="backbone"', 'embed.name="vit_test"',
                                                     "embed.image_size=50"]).embed)  # fmt: skip


def test_resize_preprocess_modes():
    im = Image.new("RGB", (200, 100), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 40, 100))  # blue left fifth: cut away by the centre crop
    crop = ResizePreprocess(64, "short_side_crop")(im)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8 and crop[:, 2:, 2].max() < 5
    square = ResizePreprocess(64, "square")(im)
    assert square.shape == (64, 64, 3) and square[:, :8, 2].min() > 240


def test_embed_reads_tar_members_back_by_offset(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tf:
        for name, im in photos()[:3]:
            data = jpeg_bytes(im.resize((80, 60)))
            info = tarfile.TarInfo(f"{name}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rec, (uids, mat, _) = _run(_cfg(shard), str(tmp_path / "run"))
    assert rec["out"] == 3 and mat.shape == (3, 5632)
    direct = DescriptorPreprocess()(photos()[0][1].resize((80, 60)))
    assert max(float(direct @ v) for v in mat) > 0.98


def test_embed_config_errors_name_the_field():
    with pytest.raises(ValueError, match="embed.weights"):
        load_config(RunConfig, None, ['embed.model="torchscript"'])
    with pytest.raises(ValueError, match="embed.factory"):
        load_config(RunConfig, None, ['embed.model="plugin"', 'embed.factory="nocolon"'])
    with pytest.raises(ValueError, match="embed.model"):
        load_config(RunConfig, None, ['embed.model="clip"'])
    with pytest.raises(ValueError, match="cannot be imported"):
        build_embedder(load_config(RunConfig, None, ['embed.model="plugin"', 'embed.factory="nope.mod:fn"']).embed)


class _FakeCluster(LocalExecutor):
    def __init__(self, cpus: int, gpus: int) -> None:
        self.cpus, self.gpus = cpus, gpus

    @property
    def num_cpus(self) -> int:
        return self.cpus

    @property
    def num_gpus(self) -> int:
        return self.gpus


@pytest.mark.parametrize(
    ("overrides", "cpus", "gpus", "expected"),
    [
        (['embed.model="backbone"'], 16, 4, (4, 1, 1.0)),  # one actor per GPU
        (['embed.model="backbone"', "embed.cpus_per_actor=4"], 16, 0, (4, 4, 0.0)),  # CPU actors
        (['embed.model="backbone"', 'embed.device="cuda"', "embed.num_actors=8"], 4, 0, (8, 1, 1.0)),  # autoscaling
        (['embed.model="backbone"', 'embed.device="cpu"'], 8, 2, (8, 1, 0.0)),
        ([], 8, 2, (8, 1, 0.0)),  # the descriptor is CPU work
    ],
)
def test_actor_pool_shape(overrides, cpus, gpus, expected):
    stage = EmbedStage(load_config(RunConfig, None, overrides), "memory://unused")
    assert stage.pool(_FakeCluster(cpus, gpus)) == expected
