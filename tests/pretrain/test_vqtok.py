"""VQ tokenizer (``method = "vqtok"``): recipes, the loss against a float64 per-position loop (nearest code by a loop
over the codebook), the EMA codebook update, data init and dead-code restarts against hand computations, finite
extremes (blank images, a one-code codebook), 2 gloo processes against 1, bitwise resume with the export (loaded
back by BEiT's loader) and a short Fashion-MNIST run."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.methods.vqtok import VQTokConfig, VQTokMethod, code_perplexity, load_tokenizer, nearest_codes
from pretrain.optim import ScheduleValues
from pretrain.train import TrainConfig, Trainer, main
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .method_utils import fast_sets, read_metrics, slice_views
from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
TINY = str(RECIPES / "vqtok_tiny_cpu.toml")
VALUES = ScheduleValues(lr=1e-3, last_layer_lr=1e-3, weight_decay=0.0, momentum=0.0, teacher_temp=0.1)
SMALL = {"vqtok.patch_size": "7", "vqtok.codebook_size": "16", "vqtok.code_dim": "4", "vqtok.hidden_dim": "8",
         "vqtok.res_blocks": "1"}
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


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


def _sets(urls: str = "/nonexistent-{0..0}.tar", **extra: object) -> list[str]:
    return fast_sets(urls, SMALL, **extra)


def _method(**extra: object) -> VQTokMethod:
    torch.manual_seed(0)
    method = VQTokMethod(load_config(TrainConfig, TINY, _sets(**extra)))
    method.setup(torch.device("cpu"))
    method.train_mode()
    return method


def _normalised(value: float) -> torch.Tensor:
    """8 crops of one flat 0-255 grey ``value`` as the loader hands them (ImageNet-normalised)."""
    return ((torch.full((8, 3, 28, 28), value / 255) - MEAN[:, None, None]) / STD[:, None, None]).contiguous()


# ---------------------------------------------------------------------------------------------- recipes
def test_recipes_parse_and_validate():
    cfg = load_config(TrainConfig, str(RECIPES / "vqtok_beit_base.toml"))
    assert type(cfg) is VQTokConfig and cfg.method == "vqtok"
    v = cfg.vqtok
    assert (v.patch_size, v.codebook_size, v.beta, cfg.data.crops.global_size) == (16, 8192, 0.25, 224)
    assert cfg.data.crops.global_size // v.patch_size == 14  # one code per ViT-B/16 patch
    tiny = load_config(TrainConfig, TINY)
    assert type(tiny) is VQTokConfig and (tiny.vqtok.patch_size, tiny.data.crops.global_size) == (4, 28)
    for field, value in (("vqtok.patch_size", "0"), ("vqtok.patch_size", "5"), ("vqtok.codebook_size", "0"),
                         ("vqtok.beta", "-1"), ("vqtok.decay", "1.0"), ("vqtok.dead_threshold", "1.0"),
                         ("vqtok.res_blocks", "-1")):
        with pytest.raises(ValueError, match=field):
            load_config(TrainConfig, TINY, [f"{field}={value}"])


# ---------------------------------------------------------------------------------------------- the loss
def test_loss_equals_a_float64_loop_over_positions_and_codes():
    method = _method()
    tok = method.arch.tokenizer
    g = torch.Generator().manual_seed(1)
    crops = torch.randn(6, 3, 28, 28, generator=g)
    with torch.no_grad():  # codes at the scale of the encoder output, so that several are used
        tok.codebook.copy_(tok.encoder(crops).permute(0, 2, 3, 1).reshape(-1, 4)[torch.randperm(96, generator=g)[:16]]
                           + 0.01 * torch.randn(16, 4, generator=g))
    loss, out = method.compute_losses({"global_crops": crops}, VALUES)
    ref = copy.deepcopy(tok).double()
    rec, commit, used = 0.0, 0.0, set()
    with torch.no_grad():
        for i in range(6):
            z = ref.encoder(crops[i : i + 1].double())[0]  # (d, 4, 4)
            q = torch.zeros_like(z)
            for r in range(4):
                for c in range(4):
                    d = [float((z[:, r, c] - e).square().sum()) for e in ref.codebook]
                    k = int(np.argmin(d))
                    used.add(k)
                    q[:, r, c] = ref.codebook[k]
                    commit += d[k]
            rec += float((ref.decoder(q[None])[0] - crops[i].double()).square().sum())
    want_rec, want_commit = rec / crops.numel(), commit / (6 * 16 * 4)
    assert len(used) > 3
    assert float(out["losses"]["recon"]) == pytest.approx(want_rec, rel=1e-5)
    assert float(out["losses"]["commit"]) == pytest.approx(want_commit, rel=1e-4)
    value = float(loss.detach())
    assert value == pytest.approx(want_rec + 0.25 * want_commit, rel=1e-5) == float(out["losses"]["total"])
    loss.backward()  # straight-through: the reconstruction reaches the encoder; the codebook is a buffer
    first = tok.encoder[0].weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0
    assert not tok.codebook.requires_grad


def test_perplexity_and_nearest_codes():
    assert float(code_perplexity(torch.tensor([5.0, 0, 0, 5]))) == pytest.approx(2.0)
    assert float(code_perplexity(torch.ones(64))) == pytest.approx(64.0, rel=1e-5)
    assert float(code_perplexity(torch.tensor([0.0, 7, 0]))) == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert float(code_perplexity(p * 8)) == pytest.approx(math.exp(-(p * p.log()).sum()))
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    assert nearest_codes(torch.tensor([[0.9, 0.2], [0.1, 0.1], [0.0, 2.0], [5.0, 5.0]]), e).tolist() == [1, 0, 2, 2]


# ---------------------------------------------------------------------------------------------- the codebook
def _dist_to_rows(rows: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    return torch.cdist(rows.double(), cands.double()).min(1).values


def test_data_init_ema_update_and_dead_code_restart():
    method = _method()
    tok, s = method.arch.tokenizer, method.cfg.vqtok
    g = torch.Generator().manual_seed(2)
    x0, x1, x2 = (torch.randn(8, 3, 28, 28, generator=g) for _ in range(3))
    # step 0: the codebook becomes 16 distinct candidate vectors (4 images x 2 crops x 4 patches = 32 candidates)
    method.compute_losses({"global_crops": x0}, VALUES)
    cands = method._pending["candidates"].flatten(0, 1)
    assert cands.shape == (32, 4)
    with torch.no_grad():
        z0 = tok(x0, decode=False)["z"].reshape(-1, 4)
    assert (_dist_to_rows(cands, z0) == 0).all()  # candidates are encoder outputs of the batch
    method.after_step(VALUES)
    assert (_dist_to_rows(tok.codebook, cands) == 0).all() and len(torch.unique(tok.codebook, dim=0)) == 16
    assert torch.equal(tok.ema_count, torch.ones(16)) and torch.equal(tok.ema_sum, tok.codebook)
    # step 1: EMA of counts and sums, codebook = sums / counts (computed by hand)
    count, total = tok.ema_count.clone(), tok.ema_sum.clone()
    method.compute_losses({"global_crops": x1}, VALUES)
    with torch.no_grad():
        res = tok(x1, decode=False)
    codes, z = res["codes"].flatten(), res["z"].reshape(-1, 4)
    n = torch.zeros(16)
    sums = torch.zeros(16, 4, dtype=torch.float64)
    for k, v in zip(codes.tolist(), z.double()):
        n[k] += 1
        sums[k] += v
    method.after_step(VALUES)
    want_count = s.decay * count + (1 - s.decay) * n
    want_sum = s.decay * total.double() + (1 - s.decay) * sums
    torch.testing.assert_close(tok.ema_count, want_count)
    torch.testing.assert_close(tok.codebook.double(), want_sum / want_count.double()[:, None], rtol=1e-5, atol=1e-5)
    # step 2: two codes moved far away (unused) with a count of 0 restart at candidates of the batch with count 1
    dead = [3, 11]
    tok.ema_count[dead] = 0.0
    tok.codebook[dead] = 1e3
    tok.ema_sum[dead] = 0.0
    method.compute_losses({"global_crops": x2}, VALUES)
    with torch.no_grad():
        assert not set(dead) & set(tok(x2, decode=False)["codes"].flatten().tolist())
    cands = method._pending["candidates"].flatten(0, 1)
    method.after_step(VALUES)
    assert (_dist_to_rows(tok.codebook[dead], cands) == 0).all() and torch.equal(tok.ema_count[dead], torch.ones(2))
    assert int(method.arch.steps) == 3
    m = method.monitor(method.compute_losses({"global_crops": x2}, VALUES)[1])
    assert set(m) == {"perplexity", "codes_used", "dead_codes"} and 1 <= m["perplexity"] <= m["codes_used"] <= 16


def test_extreme_inputs_and_a_one_code_codebook_stay_finite():
    method = _method()
    tok = method.arch.tokenizer
    for x in (_normalised(0), _normalised(255), 1e4 * torch.randn(8, 3, 28, 28)):
        method.arch.zero_grad()
        loss, out = method.compute_losses({"global_crops": x}, VALUES)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in method.arch.parameters())
        method.after_step(VALUES)
        assert torch.isfinite(tok.codebook).all() and torch.isfinite(tok.ema_count).all()
    with torch.no_grad():  # every code the same vector: one code used, perplexity 1
        tok.codebook.copy_(tok.codebook[:1].expand(16, -1))
    loss, out = method.compute_losses({"global_crops": _normalised(128)}, VALUES)
    m = method.monitor(out)
    assert torch.isfinite(loss) and m["perplexity"] == pytest.approx(1.0) and m["codes_used"] == 1
    method.after_step(VALUES)
    assert torch.isfinite(tok.codebook).all()


# ---------------------------------------------------------------------------------------------- distributed
def _batches(n_steps: int, b: int = 8):
    g = torch.Generator().manual_seed(0)
    return [{"global_crops": torch.randn(2 * b, 3, 28, 28, generator=g)} for _ in range(n_steps)]


def _parity_run(rank: int, world: int, out: str) -> dict:
    from pretrain.checkpoint import full_state_dict

    torch.set_num_threads(1)
    sets = _sets(**{"data.shards.batch_size": 8 // world, "schedule.base_lr": "0.05", "train.optimizer": '"sgd"'})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), out)
    phase = trainer.phases[0]
    losses = [trainer.train_step(slice_views(b, rank, world), step, phase)["loss"]
              for step, b in enumerate(_batches(3))]
    sd = full_state_dict(trainer.method.arch)
    return {"losses": losses, "model": {k: v.numpy().copy() for k, v in sd.items()} if rank == 0 else None}


def test_two_processes_equal_one(tmp_path):
    one = _parity_run(0, 1, str(tmp_path / "one"))
    two = run_distributed(_parity_run, str(tmp_path / "two"), world_size=2, timeout_s=300)
    np.testing.assert_allclose(np.mean([r["losses"] for r in two], axis=0), one["losses"], atol=1e-5, rtol=1e-5)
    assert one["losses"][0] != one["losses"][2]
    assert int(one["model"]["steps"]) == int(two[0]["model"]["steps"]) == 3
    assert {"tokenizer.codebook", "tokenizer.ema_count", "tokenizer.ema_sum"} <= set(one["model"])
    for k, v in one["model"].items():  # the codebook (EMA of counts and sums over both ranks) included
        np.testing.assert_allclose(two[0]["model"][k], v, atol=1e-5, rtol=1e-5, err_msg=k)


# ---------------------------------------------------------------------------------------------- resume, export
def _train(out: Path, urls: str, **extra: object) -> int:
    return main([TINY, "--out", str(out), *[a for kv in _sets(urls, **extra) for a in ("--set", kv)]])


def test_resume_is_bitwise_and_exports_a_loadable_tokenizer(tmp_path, shards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(straight, shards) == 0
    assert _train(resumed, shards, **{"train.stop_at": 3}) == 0
    assert _train(resumed, shards) == 0
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 7)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "recon", "commit", "lr", "grad_norm/tokenizer"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    assert a[0]["loss"] != a[-1]["loss"] and {"perplexity", "codes_used", "dead_codes"} <= set(a[1])
    sa, sb = (torch.load(d / "export" / "tokenizer.pth", weights_only=True) for d in (straight, resumed))
    assert sa["state_dict"].keys() == sb["state_dict"].keys()
    assert all(torch.equal(sa["state_dict"][k], sb["state_dict"][k]) for k in sa["state_dict"])
    assert sa["method"] == "vqtok" and sa["img_size"] == 28 and sa["config"]["codebook_size"] == 16
    tok, _ = load_tokenizer(straight / "export")  # the folder or the file
    trainer = Trainer(load_config(TrainConfig, TINY, _sets(shards)), straight)
    assert trainer.resume() == 6
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(tok(x, decode=False)["codes"], trainer.arch.tokenizer(x, decode=False)["codes"])
    assert not tok.training
    for bad in (tmp_path / "nowhere", straight / "config.toml"):
        with pytest.raises(ValueError, match="beit.tokenizer"):
            load_tokenizer(bad)


# ---------------------------------------------------------------------------------------------- it learns
def test_fashion_mnist_run_lowers_the_reconstruction_and_uses_the_codebook(tmp_path):
    """80 steps of 32 images (both crops) of the tiny recipe's tokenizer (patch 4, 128 codes, 32 channels) on 512
    Fashion-MNIST images: the reconstruction error falls below 30% of its start (measured 2.25 -> 0.44) and most
    codes are in use (perplexity 85, 120 of 128 codes in the last batch)."""
    shards = write_shards(tmp_path / "shards", n=512, per_shard=128)
    sets = fast_sets(shards, **{"data.shards.batch_size": 32, "schedule.epoch_length": 20, "schedule.epochs": 4,
                                "schedule.lr_reference_batch": 32, "train.log_every": 5, "train.monitor_every": 5,
                                "train.checkpoint_every": 1000, "vqtok.hidden_dim": 32})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), tmp_path / "run")
    assert trainer.fit() == 80
    metrics = read_metrics(tmp_path / "run")
    recon = [m["recon"] for m in metrics]
    ppl = [m["perplexity"] for m in metrics]
    print(f"recon {[round(x, 3) for x in recon]}; perplexity {[round(x, 1) for x in ppl]}; codes used "
          f"{[m['codes_used'] for m in metrics]}")
    assert recon[0] > 1.5 and np.mean(recon[-3:]) < 0.3 * recon[0], recon
    assert np.mean(ppl[-3:]) > 40 and metrics[-1]["codes_used"] > 64, ppl
