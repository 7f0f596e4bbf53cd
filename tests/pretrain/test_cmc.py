"""CMC (``method = "cmc"``): recipes, the Lab conversion against skimage and known colours, the bank (NCE and
softmax) and in-batch losses against float64 loops, finite extreme logits, 2 gloo processes equal 1 (banks
included), bitwise resume, and a short run on colour photographs that lowers the loss and beats random init on k-NN."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pretrain.checkpoint import dcp_to_state_dict
from pretrain.data.augment import IMAGENET_MEAN, IMAGENET_STD
from pretrain.eval.config import KnnConfig
from pretrain.eval.knn import knn_predict
from pretrain.losses.contrastive import MemoryBank, estimate_nce_log_z, estimate_nce_z, nce_loss
from pretrain.methods.cmc import CMCConfig, CMCMethod, lab_views, noise_rows, rgb_to_lab
from pretrain.models import build_backbone
from pretrain.optim import Schedules, ScheduleValues
from pretrain.train import TrainConfig, Trainer, main
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
TINY = str(RECIPES / "cmc_tiny_cpu.toml")
VALUES = ScheduleValues(lr=0.1, last_layer_lr=0.1, weight_decay=0.0, momentum=0.9, teacher_temp=0.1)
SMALL = {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "cmc.dim": 16, "cmc.num_negatives": 8}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine oversubscribed threads make a step much slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=64, per_shard=32)


def _sets(urls: str, **extra: object) -> list[str]:
    """Overrides making the tiny recipe a seconds-long run (batch 4, 6 steps, lr x 0.1 after epoch 2)."""
    sets = {"data.shards.urls": f'["{urls}"]', "data.shards.batch_size": 4, "data.shards.num_workers": 0,
            "data.shards.shuffle_buffer": 8, "schedule.epoch_length": 2, "schedule.epochs": 3,
            "schedule.lr_milestones": "[2]", "schedule.lr_reference_batch": 4, "train.log_every": 1,
            "train.monitor_every": 2, "train.checkpoint_every": 2, **SMALL}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def _method(urls: str, **extra: object) -> CMCMethod:
    torch.manual_seed(0)
    method = CMCMethod(load_config(TrainConfig, TINY, _sets(urls, **extra)))
    method.setup(torch.device("cpu"))
    method.train_mode()
    return method


def _batch(b: int, seed: int = 0, keys: list[int] | None = None) -> dict:
    """A hand-made batch of ``b`` images (two global crops each, crop-major) with instance keys of the shards."""
    g = torch.Generator().manual_seed(seed)
    keys = list(range(b)) if keys is None else keys
    return {"global_crops": torch.randn(2 * b, 3, 28, 28, generator=g), "keys": [f"{k:06d}" for k in keys],
            "sets": torch.zeros(b, dtype=torch.long)}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- recipes
def test_recipes_parse_with_the_papers_settings():
    cfg = load_config(TrainConfig, str(RECIPES / "cmc_resnet50.toml"))
    assert type(cfg) is CMCConfig and cfg.backbone.name == "resnet50" and cfg.backbone.overrides == {"width": 32}
    c = cfg.cmc
    assert (c.negatives, c.loss, c.num_negatives, c.temperature, c.bank_momentum, c.dim) == \
        ("bank", "nce", 16384, 0.07, 0.5, 128)
    assert cfg.train.optimizer == "sgd" and c.sgd_momentum == 0.9 and cfg.optim.clip_grad == 0
    s = cfg.schedule
    assert s.base_lr == 0.03 and s.lr_reference_batch == 256 == cfg.data.shards.batch_size * 8
    assert s.weight_decay == s.weight_decay_end == 1e-4 and s.epochs == 200 and s.warmup_epochs == 0
    e = s.epoch_length
    lrs = [Schedules(s, 256).at(i * e).lr for i in (0, 119, 120, 159, 160, 199)]
    assert lrs == pytest.approx([0.03] * 2 + [3e-3] * 2 + [3e-4] * 2)
    crops = cfg.data.crops
    assert crops.global_size == 224 and crops.global_scale == (0.2, 1.0) and crops.flip_p == 0.5
    assert crops.jitter_p == crops.grayscale_p == crops.solarize_p == crops.blur_p_global1 == 0.0
    tiny = load_config(TrainConfig, TINY)
    assert type(tiny) is CMCConfig and tiny.backbone.name == "resnet18_small" and tiny.data.crops.global_size == 28
    assert tiny.cmc.num_negatives == 256 and tiny.schedule.lr_milestones == [4, 5]
    for bad, field in (("cmc.negatives=\"queue\"", "cmc.negatives"), ("cmc.loss=\"hinge\"", "cmc.loss"),
                       ("cmc.temperature=0", "cmc.temperature"), ("cmc.bank_momentum=1.0", "cmc.bank_momentum"),
                       ("cmc.num_negatives=0", "cmc.num_negatives"),
                       ("backbone.overrides={in_chans = 3}", "backbone.overrides.in_chans")):
        with pytest.raises(ValueError, match=field):
            load_config(TrainConfig, TINY, [bad])


# ---------------------------------------------------------------------------------------------- Lab
def _lab64(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3) in [0, 1] -> CIE Lab (D65), float64, written from the CIE definitions."""
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def test_lab_conversion_matches_references():
    from skimage.color import rgb2lab

    known = {(1.0, 1.0, 1.0): (100.0, 0.0, 0.0), (0.0, 0.0, 0.0): (0.0, 0.0, 0.0),
             (1.0, 0.0, 0.0): (53.24, 80.09, 67.20), (0.0, 1.0, 0.0): (87.73, -86.18, 83.18),
             (0.0, 0.0, 1.0): (32.30, 79.19, -107.86)}
    rgb = torch.tensor(list(known), dtype=torch.float32).view(-1, 3, 1, 1)
    lab = rgb_to_lab(rgb)[:, :, 0, 0]
    np.testing.assert_allclose(lab.numpy(), np.array(list(known.values())), atol=0.1)
    pixels = np.random.default_rng(0).random((16, 16, 3))
    ours = rgb_to_lab(torch.from_numpy(pixels).float().permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, _lab64(pixels), atol=2e-3)
    np.testing.assert_allclose(ours, rgb2lab(pixels), atol=1e-2)  # skimage (its matrix has 6 digits, ours 7)
    # the views: undo the ImageNet normalisation, then L and ab scaled to [-1, 1] over the sRGB gamut
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    l_view, ab_view = lab_views((rgb - mean) / std)
    assert l_view.shape == (5, 1, 1, 1) and ab_view.shape == (5, 2, 1, 1)
    np.testing.assert_allclose(l_view.flatten().numpy(), (lab[:, 0].numpy() - 50) / 50, atol=1e-4)
    np.testing.assert_allclose(ab_view[:, 0].flatten().numpy(), (lab[:, 1].numpy() - 6.025) / 92.208, atol=1e-4)
    np.testing.assert_allclose(ab_view[:, 1].flatten().numpy(), (lab[:, 2].numpy() + 6.6895) / 101.1675, atol=1e-4)
    assert float(ab_view[3, 0]) == pytest.approx(-1.0, abs=1e-3)  # green: the gamut's lowest a
    assert float(ab_view[4, 1]) == pytest.approx(-1.0, abs=1e-3)  # blue: the gamut's lowest b


# ---------------------------------------------------------------------------------------------- the loss
def _reference(method: CMCMethod, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 projections of both views by a float64 copy of the encoders (train-mode BN, as the method)."""
    arch = copy.deepcopy(method.arch).double().train()
    view_l, view_ab = lab_views(batch["global_crops"][: len(batch["keys"])])
    out = []
    for enc, v in ((arch.l, view_l), (arch.ab, view_ab)):
        z = enc["head"](enc["backbone"](v.double())).detach()
        out.append(z / z.norm(dim=1, keepdim=True))
    return out[0], out[1]


@pytest.mark.parametrize("variant", ["nce", "softmax", "batch"])
def test_loss_equals_a_float64_loop(shards, variant):
    extra = {"cmc.negatives": '"batch"'} if variant == "batch" else {"cmc.loss": f'"{variant}"'}
    method = _method(shards, **extra, **{"cmc.temperature": 0.2})
    arch, t, b = method.arch, 0.2, 6
    batch = _batch(b, keys=[5, 9, 0, 63, 17, 33])
    banks = {} if variant == "batch" else {"l": arch.bank_l.vectors.double().clone(),
                                           "ab": arch.bank_ab.vectors.double().clone()}
    z_l, z_ab = _reference(method, batch)
    loss, out = method.compute_losses(batch, VALUES)
    total = 0.0
    if variant == "batch":
        for anchor, other in ((z_l, z_ab), (z_ab, z_l)):
            for i in range(b):
                logits = [float(anchor[i] @ other[j]) / t for j in range(b)]
                total += (-logits[i] + math.log(sum(math.exp(x) for x in logits))) / b
    else:
        idx, k, n = [5, 9, 0, 63, 17, 33], 8, 64
        noise = noise_rows(0, 0, torch.arange(b), k, n)
        for anchor, bank in ((z_l, banks["ab"]), (z_ab, banks["l"])):
            s_own = [float(anchor[i] @ bank[idx[i]]) / t for i in range(b)]
            s_noise = [[float(anchor[i] @ bank[int(j)]) / t for j in noise[i]] for i in range(b)]
            if variant == "softmax":
                for i in range(b):
                    total += (math.log(math.exp(s_own[i]) + sum(math.exp(x) for x in s_noise[i])) - s_own[i]) / b
            else:  # NCE, Z = n x mean exp over the first batch's noise scores
                z = n * np.mean([math.exp(x) for row in s_noise for x in row])
                h = [math.exp(x) / z / (math.exp(x) / z + k / n) for x in s_own]
                hn = [[math.exp(x) / z / (math.exp(x) / z + k / n) for x in row] for row in s_noise]
                total += sum(-math.log(h[i]) - sum(math.log(1 - v) for v in hn[i]) for i in range(b)) / b
    assert float(loss) == pytest.approx(total, rel=1e-5, abs=1e-5) and float(loss) > 0
    assert float(out["losses"]["total"]) == pytest.approx(float(out["losses"]["l_to_ab"] + out["losses"]["ab_to_l"]))
    loss.backward()
    assert all(p.grad is not None for p in method.arch.l.parameters())
    assert method.arch.ab["head"].weight.grad.abs().sum() > 0
    if variant != "batch":  # the banks: both updated after the step, v <- normalize(0.5 v + 0.5 z)
        method.after_step(VALUES)
        for name, z in (("l", z_l), ("ab", z_ab)):
            expected = 0.5 * banks[name][idx] + 0.5 * z
            expected = expected / expected.norm(dim=1, keepdim=True)
            np.testing.assert_allclose(getattr(arch, f"bank_{name}").vectors[idx].numpy(), expected.numpy(), atol=1e-5)
            untouched = [i for i in range(n) if i not in idx]
            assert torch.equal(getattr(arch, f"bank_{name}").vectors[untouched].double(), banks[name][untouched])
        assert int(arch.steps) == 1 and int(arch.seen.sum()) == b
        assert set(method.monitor(out)) == {"pos_sim", "z_std", "bank_pos_sim", "bank_seen"}


def test_log_space_nce_equals_the_shared_nce_loss():
    g = torch.Generator().manual_seed(3)
    bank = MemoryBank(50, 8, seed=1)
    f, idx = torch.randn(5, 8, generator=g), torch.tensor([0, 4, 9, 49, 4])
    noise = torch.randint(50, (5, 7), generator=g)
    log_z = estimate_nce_log_z(f, bank, noise, 0.1)
    assert log_z == pytest.approx(math.log(estimate_nce_z(f, bank, noise, 0.1)), rel=1e-5)
    assert float(nce_loss(f, idx, bank, noise, 0.1, log_z=log_z)) == pytest.approx(
        float(nce_loss(f, idx, bank, noise, 0.1, math.exp(log_z))), rel=1e-5)
    # the noise of a global row does not depend on which rank draws it
    rows = noise_rows(7, 3, torch.arange(6), 11, 50)
    assert torch.equal(torch.cat([noise_rows(7, 3, torch.arange(3), 11, 50),
                                  noise_rows(7, 3, torch.arange(3, 6), 11, 50)]), rows)
    assert not torch.equal(noise_rows(7, 4, torch.arange(6), 11, 50), rows) and int(rows.max()) < 50


@pytest.mark.parametrize("variant", ["nce", "softmax", "batch"])
def test_extreme_logits_stay_finite(shards, variant):
    extra = {"cmc.negatives": '"batch"'} if variant == "batch" else {"cmc.loss": f'"{variant}"'}
    method = _method(shards, **extra, **{"cmc.temperature": "1e-4"})
    arch = method.arch
    with torch.no_grad():
        for enc in (arch.l, arch.ab):
            enc["head"].weight.mul_(1e3)
    batch = _batch(4, keys=[1, 2, 3, 4])
    batch["global_crops"][:] = batch["global_crops"][:1]  # identical images: every candidate ties with the positive
    if variant != "batch":
        with torch.no_grad():
            z_l, z_ab = (arch.embed(enc, v) for enc, v in zip((arch.l, arch.ab),
                                                              lab_views(batch["global_crops"][:1])))
            arch.bank_l.vectors.copy_(z_l.expand_as(arch.bank_l.vectors))
            arch.bank_ab.vectors.copy_(z_ab.expand_as(arch.bank_ab.vectors))
    loss, _ = method.compute_losses(batch, VALUES)
    loss.backward()
    assert torch.isfinite(loss) and float(loss) > 0
    assert all(torch.isfinite(p.grad).all() for p in arch.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- distributed
PARITY = {"backbone.name": '"vit_test"', "backbone.overrides": "{patch_size = 7, img_size = 28, init_values = 0}",
          "schedule.base_lr": "0.5", "train.optimizer": '"sgd"'}


def _slice(batch: dict, rank: int, world: int) -> dict:
    x, b = batch["global_crops"], len(batch["keys"])
    per = b // world
    views = x.reshape(2, b, *x.shape[1:])[:, rank * per:(rank + 1) * per].reshape(-1, *x.shape[1:])
    return {"global_crops": views, "keys": batch["keys"][rank * per:(rank + 1) * per],
            "sets": batch["sets"][rank * per:(rank + 1) * per]}


def _parity_run(rank: int, world: int, urls: str, out: str) -> dict:
    from pretrain.checkpoint import full_state_dict

    torch.set_num_threads(1)
    results = {}
    for variant, extra in (("nce", {}), ("batch", {"cmc.negatives": '"batch"'})):
        cfg = load_config(TrainConfig, TINY, _sets(urls, **PARITY, **extra, **{"data.shards.batch_size": 8 // world}))
        trainer = Trainer(cfg, f"{out}/{variant}")
        phase, arch = trainer.phases[0], trainer.method.arch
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(1)).tolist()
        batches = [_batch(8, seed=s, keys=perm[8 * s:8 * s + 8]) for s in range(3)]
        losses = [trainer.train_step(_slice(b, rank, world), step, phase)["loss"] for step, b in enumerate(batches)]
        weights = {**full_state_dict(arch.l), **{f"ab.{k}": v for k, v in full_state_dict(arch.ab).items()}}
        results[variant] = {"losses": losses, "buffers": {k: v.numpy().copy() for k, v in arch.named_buffers()},
                            "weights": {k: v.numpy().copy() for k, v in weights.items()} if rank == 0 else None}
    return results


def test_two_processes_equal_one_banks_included(tmp_path, shards):
    one = _parity_run(0, 1, shards, str(tmp_path / "one"))
    two = run_distributed(_parity_run, shards, str(tmp_path / "two"), world_size=2, timeout_s=300)
    for variant in ("nce", "batch"):
        single, ranks = one[variant], [r[variant] for r in two]
        np.testing.assert_allclose(np.mean([r["losses"] for r in ranks], axis=0), single["losses"], atol=1e-5)
        assert single["losses"][0] != single["losses"][2]
        for k, v in single["weights"].items():
            np.testing.assert_allclose(ranks[0]["weights"][k], v, rtol=1e-5, atol=1e-5, err_msg=k)
        for name, v in single["buffers"].items():
            np.testing.assert_array_equal(ranks[0]["buffers"][name], ranks[1]["buffers"][name])  # same on all ranks
            np.testing.assert_allclose(ranks[0]["buffers"][name], v, atol=1e-5, err_msg=name)
    bufs = one["nce"]["buffers"]
    assert {"bank_l.vectors", "bank_ab.vectors", "log_z_l", "log_z_ab", "seen", "steps"} <= set(bufs)
    assert int(bufs["steps"]) == 3 and int(bufs["seen"].sum()) == 24 and int(bufs["z_ready"]) == 1
    assert "bank_l.vectors" not in one["batch"]["buffers"]


# ---------------------------------------------------------------------------------------------- resume
def _train(out: Path, urls: str, **extra: object) -> int:
    return main([TINY, "--out", str(out), *[a for kv in _sets(urls, **extra) for a in ("--set", kv)]])


def test_resume_is_bitwise_with_the_banks(tmp_path, shards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(straight, shards) == 0
    assert _train(resumed, shards, **{"train.stop_at": 3}) == 0
    mid = dcp_to_state_dict(resumed / "checkpoints")
    assert int(mid["model.steps"]) == 3 and int(mid["model.z_ready"]) == 1 and int(mid["model.seen"].sum()) > 4
    assert _train(resumed, shards) == 0
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 7)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "l_to_ab", "ab_to_l", "lr", "grad_norm/l", "grad_norm/ab"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    assert a[0]["lr"] == 0.03 and a[-1]["lr"] == pytest.approx(0.003)  # the step schedule: x 0.1 at epoch 2
    sa, sb = dcp_to_state_dict(straight / "checkpoints"), dcp_to_state_dict(resumed / "checkpoints")
    model = [k for k in sa if k.startswith("model.")]
    assert {"model.bank_l.vectors", "model.bank_ab.vectors", "model.log_z_l", "model.l.head.weight",
            "model.ab.backbone.conv1.weight"} <= set(model)
    assert all(torch.equal(sa[k], sb[k]) for k in model)
    assert sa["model.ab.backbone.conv1.weight"].shape[1] == 2 and sa["model.l.backbone.conv1.weight"].shape[1] == 1
    for name, prefix, chans in (("backbone.pth", "model.l.backbone.", 1), ("ab_backbone.pth", "model.ab.backbone.", 2)):
        net = build_backbone(None, weights=str(straight / "export" / name))  # the exports load as plain backbones
        assert net.cfg.in_chans == chans and all(torch.equal(v, sa[prefix + k]) for k, v in net.state_dict().items())
    assert "pos_sim" in a[1] and "bank_seen" in a[1]


# ---------------------------------------------------------------------------------------------- it learns
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel")


def _photo_crops(split: str, per_photo: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Square crops (40-64 px, resized to 48) of skimage's colour photographs, label = the photo; 'train' crops
    come from the left 60 % of each photo, 'test' crops from the right 40 % (disjoint pixels)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()[..., :3]
        h, w = photo.shape[:2]
        s = 192 / min(h, w)
        photo = np.asarray(Image.fromarray(photo).resize((round(w * s), round(h * s)), Image.BICUBIC))
        h, w = photo.shape[:2]
        lo, hi = (0, int(0.6 * w)) if split == "train" else (int(0.6 * w), w)
        for _ in range(per_photo):
            side = int(rng.integers(40, 64))
            x, y = int(rng.integers(lo, hi - side)), int(rng.integers(0, h - side))
            crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((48, 48), Image.BICUBIC)
            images.append(np.asarray(crop)), labels.append(label)
    return np.stack(images), np.array(labels)


def _write_photo_shards(out: Path, per_photo: int = 32) -> str:
    images, labels = _photo_crops("train", per_photo, seed=0)
    order = np.random.default_rng(1).permutation(len(images))
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "photo-%06d.tar"), maxcount=128, verbose=0) as sink:
        for i in order:
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, "JPEG", quality=92)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "cls": int(labels[i])})
    return str(out / f"photo-{{000000..{(len(images) - 1) // 128:06d}}}.tar")


def _features(arch: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """Concatenated L and ab backbone features (CMC's evaluation) of 28 px resizes of ``images``."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = torch.nn.functional.interpolate(x, size=28, mode="bilinear", antialias=True, align_corners=False)
    view_l, view_ab = lab_views((x - mean) / std)
    with torch.no_grad():
        return torch.cat([arch.l["backbone"](view_l), arch.ab["backbone"](view_ab)], dim=1)


def _knn(arch: torch.nn.Module) -> float:
    xtr, ytr = _photo_crops("train", 40, seed=10)
    xte, yte = _photo_crops("test", 25, seed=11)
    arch = arch.eval()
    pred = knn_predict(_features(arch, xtr), torch.as_tensor(ytr), _features(arch, xte), KnnConfig(ks=[10]),
                       num_classes=len(PHOTOS), device="cpu")[10]
    return float((pred[:, 0] == torch.as_tensor(yte)).float().mean())


def test_colour_photo_run_lowers_the_loss_and_beats_random_init_on_knn(tmp_path):
    urls = _write_photo_shards(tmp_path / "photos")
    sets = _sets(urls, **{"backbone.name": '"resnet18_small"', "backbone.overrides": "{width = 16}",
                          "cmc.dim": 64, "cmc.num_negatives": 64, "data.shards.batch_size": 32,
                          "data.shards.shuffle_buffer": 64, "schedule.epoch_length": 20, "schedule.epochs": 3,
                          "schedule.lr_milestones": "[]", "schedule.lr_reference_batch": 32,
                          "schedule.base_lr": 0.03, "train.log_every": 1, "train.checkpoint_every": 100})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), tmp_path / "run")
    random_init = copy.deepcopy(trainer.method.arch)
    assert trainer.fit() == 60
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    before, after = _knn(random_init), _knn(trainer.method.arch)
    early, late = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"CMC loss first 10 steps {early:.3f}, last 10 {late:.3f}; k-NN@10 by photo: random init {before:.3f}, "
          f"after 60 steps {after:.3f}")
    assert late < early - 0.3, losses
    assert after > before + 0.03, (before, after)
