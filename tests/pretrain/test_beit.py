"""BEiT (``method = "beit"``): recipes and the tokenizer's checks (missing export, grid mismatch, resized tokenizer
input), the loss against a float64 per-image loop (codes by a nearest-code loop, [MASK] substitution, ViT, head,
cross-entropy on masked patches), block masking (counts, blocks, split independence), the [MASK] token semantics,
the frozen tokenizer, finite extremes, 2 gloo processes against 1, bitwise resume with the export against a
tokenizer trained through the trainer (end to end), and a Fashion-MNIST run."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.methods.beit import BEiTConfig, BEiTMethod, BEiTSection, beit_masks
from pretrain.methods.vqtok import VQTokenizer, VQTokSection
from pretrain.models import backbone_config, build_backbone
from pretrain.optim import Schedules, ScheduleValues
from pretrain.train import TrainConfig, Trainer, main
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .method_utils import fast_sets, read_metrics, slice_views
from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
TINY = str(RECIPES / "beit_tiny_cpu.toml")
VQTOK = str(RECIPES / "vqtok_tiny_cpu.toml")
VALUES = ScheduleValues(lr=1e-3, last_layer_lr=1e-3, weight_decay=0.0, momentum=0.0, teacher_temp=0.1)
SMALL = {"backbone.name": '"vit_test"', "backbone.overrides": "{patch_size = 7, img_size = 28, init_values = 0}",
         "beit.num_mask_patches": "6", "beit.min_block_patches": "2"}
#: a vqtok run whose tokenizer matches SMALL's 4 x 4 grid (7 px codes)
SMALL_TOK = {"vqtok.patch_size": "7", "vqtok.codebook_size": "16", "vqtok.code_dim": "4", "vqtok.hidden_dim": "8",
             "vqtok.res_blocks": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine oversubscribed threads make a step much slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_tokenizer(folder: Path, patch: int = 7, k: int = 16, seed: int = 0) -> str:
    """A vqtok export of an untrained tokenizer whose codes are encoder outputs (so that many are used)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = VQTokSection(patch_size=patch, codebook_size=k, code_dim=4, hidden_dim=8, res_blocks=1)
    tok = VQTokenizer(cfg)
    with torch.no_grad():
        z = tok.encoder(torch.randn(16, 3, 28, 28)).permute(0, 2, 3, 1).reshape(-1, 4)
        tok.codebook.copy_(z[torch.randperm(len(z))[:k]])
    torch.save({"method": "vqtok", "config": dataclasses.asdict(cfg), "img_size": 28, "state_dict": tok.state_dict()},
               folder / "tokenizer.pth")
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=64, per_shard=32)


def _sets(tok: str, urls: str = "/nonexistent-{0..0}.tar", **extra: object) -> list[str]:
    return fast_sets(urls, SMALL, {"beit.tokenizer": f'"{tok}"'}, **extra)


def _method(tok: str, **extra: object) -> BEiTMethod:
    torch.manual_seed(0)
    method = BEiTMethod(load_config(TrainConfig, TINY, _sets(tok, **extra)))
    method.setup(torch.device("cpu"))
    method.train_mode()
    return method


# ---------------------------------------------------------------------------------------------- recipes
def test_recipes_parse_with_the_papers_settings():
    cfg = load_config(TrainConfig, str(RECIPES / "beit_vitb16.toml"))
    assert type(cfg) is BEiTConfig and cfg.method == "beit"
    b = cfg.beit
    assert (b.num_mask_patches, b.min_block_patches, b.max_block_patches, b.min_aspect) == (75, 16, 0, 0.3)
    assert b.tokenizer.endswith("vqtok_beit_base/export") and b.tokenizer_size == 0
    vit = backbone_config(cfg.backbone.name, **cfg.backbone.overrides)  # ViT-B/16 at 224: 14 x 14 patches
    assert (vit.embed_dim, vit.depth, vit.num_heads, vit.patch_size, vit.img_size) == (768, 12, 12, 16, 224)
    assert vit.init_values == 0.1 and cfg.backbone.drop_path_rate == 0.1 and vit.pos_embed == "learned"
    tok = load_config(TrainConfig, str(RECIPES / "vqtok_beit_base.toml"))  # one code per patch
    assert tok.vqtok.patch_size == vit.patch_size and tok.data.crops.global_size == cfg.data.crops.global_size
    assert tok.vqtok.codebook_size == 8192
    s = cfg.schedule
    assert cfg.data.shards.batch_size * 32 == 2048 == s.lr_reference_batch and s.base_lr == 1.5e-3
    assert (s.epochs, s.warmup_epochs, s.weight_decay, s.epoch_length) == (800, 10, 0.05, 625)
    assert Schedules(s, 2048).peak_lr == pytest.approx(1.5e-3)
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.clip_grad == 3.0 and cfg.train.optimizer == "adamw"
    c = cfg.data.crops
    assert (c.global_size, c.global_scale, c.n_local, c.jitter_p, c.brightness, c.saturation) == (
        224, (0.08, 1.0), 0, 1.0, 0.4, 0.4)
    tiny = load_config(TrainConfig, TINY)
    assert type(tiny) is BEiTConfig and tiny.data.crops.global_size == 28 and tiny.beit.num_mask_patches == 19
    for field, value in (("beit.tokenizer", '""'), ("beit.num_mask_patches", "0"), ("beit.min_block_patches", "20"),
                         ("beit.min_aspect", "0"), ("beit.tokenizer_size", "-1"), ("beit.max_block_patches", "-1")):
        with pytest.raises(ValueError, match=field):
            load_config(TrainConfig, TINY, [f"{field}={value}"])


def test_tokenizer_errors_name_the_field_and_a_resized_view_matches_the_grid(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="beit.tokenizer: no tokenizer export"):
        _method(str(tmp_path / "missing"))
    fine = write_tokenizer(tmp_path / "p4", patch=4)  # 7 x 7 codes on 28 px; the ViT has 4 x 4 patches
    with pytest.raises(ValueError, match="beit.tokenizer: .* grids must match"):
        _method(fine)
    with pytest.raises(ValueError, match="learned position embeddings"):
        _method(tokenizer, **{"backbone.overrides": "{patch_size = 7, img_size = 28, pos_embed = 'rope'}"})
    method = _method(fine, **{"beit.tokenizer_size": 16})  # the tokenizer sees the crop at 16 px: 4 x 4 codes
    x = torch.randn(2, 3, 28, 28)
    small = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        want = method.arch.tokenizer(small, decode=False)["codes"]
    assert torch.equal(method.targets(x), want) and want.shape == (2, 16)
    loss, _ = method.compute_losses({"global_crops": torch.cat([x, x])}, VALUES)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------- the loss
def test_loss_equals_a_float64_loop_through_tokenizer_vit_and_head(tokenizer):
    method = _method(tokenizer, **{"backbone.overrides": "{patch_size = 7, img_size = 28, init_values = 0, "
                                   "num_register_tokens = 2}"})
    g = torch.Generator().manual_seed(1)
    crops = torch.randn(6, 3, 28, 28, generator=g)  # 3 images x 2 crops: the first crops are the view
    with torch.no_grad():
        method.arch.backbone.pos_embed.normal_(generator=g)
    loss, out = method.compute_losses({"global_crops": crops}, VALUES)
    masks = beit_masks(0, 0, 0, 3, (4, 4), method.cfg.beit)  # step 0, rank 0: the masks compute_losses drew
    ref = copy.deepcopy(method.arch).double().eval()
    enc, tok = ref.backbone, ref.tokenizer
    total, count, used = 0.0, 0, set()
    with torch.no_grad():
        for i in range(3):
            x = crops[i : i + 1].double()
            z = tok.encoder(x)[0]  # (d, 4, 4): the code of patch j by a loop over the codebook
            codes = [int(np.argmin([float((z[:, j // 4, j % 4] - e).square().sum()) for e in tok.codebook]))
                     for j in range(16)]
            used.update(codes)
            patches = enc.patch_embed(x)[0].clone()
            patches[masks[i]] = enc.mask_token[0]
            seq = torch.cat([enc.cls_token[0] + enc.pos_embed[0, :1], enc.register_tokens[0],
                             patches + enc.pos_embed[0, 1:]])[None]
            for blk in enc.blocks:
                seq = blk(seq)
            logits = ref.head(enc.norm(seq)[0, 3:])
            for j in range(16):
                if masks[i, j]:
                    total += float(torch.logsumexp(logits[j], 0) - logits[j, codes[j]])
                    count += 1
    assert count == int(masks.sum()) and 3 * 2 <= count <= 3 * 6 and len(used) > 2
    value = float(loss.detach())
    assert value == pytest.approx(total / count, rel=1e-5) and float(out["losses"]["total"]) == value
    loss.backward()
    grads = [p.grad for p in method.arch.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and method.arch.head.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in method.arch.tokenizer.parameters())


# ---------------------------------------------------------------------------------------------- masking
def _components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected masked regions."""
    seen, sizes = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            r, c = stack.pop()
            size += 1
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        sizes.append(size)
    return sizes


def test_block_masks_count_blocks_and_split_independence():
    cfg = BEiTSection(tokenizer="x")  # the paper's 75 of 196, blocks of >= 16
    masks = beit_masks(0, 5, 0, 64, (14, 14), cfg)
    counts = masks.sum(1)
    assert masks.dtype == torch.bool and (counts <= 75).all() and (counts >= 16).all()
    assert 0.33 < float(counts.float().mean()) / 196 < 0.39  # ~40%; a mask can end a few patches short
    assert all(min(_components(m.view(14, 14).numpy())) >= 16 for m in masks)
    tiny = BEiTSection(tokenizer="x", num_mask_patches=19, min_block_patches=4)  # the tiny recipe's 7 x 7
    t = beit_masks(0, 5, 0, 64, (7, 7), tiny)
    assert (t.sum(1) <= 19).all() and 0.3 < float(t.float().mean()) < 0.4
    a = beit_masks(0, 3, 0, 4, (14, 14), cfg)
    assert torch.equal(a[2:], beit_masks(0, 3, 2, 2, (14, 14), cfg))  # rank 1 of 2: images 2, 3
    assert not torch.equal(a[0], a[1]) and not torch.equal(beit_masks(0, 4, 0, 4, (14, 14), cfg), a)
    assert not torch.equal(beit_masks(1, 3, 0, 4, (14, 14), cfg), a)
    with pytest.raises(ValueError, match="beit.num_mask_patches"):
        beit_masks(0, 0, 0, 1, (4, 4), BEiTSection(tokenizer="x", num_mask_patches=16, min_block_patches=2))


def test_mask_token_replaces_masked_patches_and_the_encoder_sees_every_token(tokenizer):
    method = _method(tokenizer)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = method.predict(x, 0)
        masks = base["masks"]
        j = int(masks[0].nonzero()[0])  # a masked patch: its pixels change neither the logits nor anything else
        r, c = divmod(j, 4)
        y = x.clone()
        y[0, :, r * 7 : (r + 1) * 7, c * 7 : (c + 1) * 7] = 1e3 * torch.randn(3, 7, 7)
        net = method.arch.backbone
        after = net.forward_features(y, masks)["x_norm_patchtokens"]
        assert torch.equal(after, net.forward_features(x, masks)["x_norm_patchtokens"])
        assert not torch.equal(net.forward_features(y)["x_norm_patchtokens"], net.forward_features(x)[
            "x_norm_patchtokens"])  # unmasked, the same pixels do change the output
        v = int((~masks[0]).nonzero()[0])  # a visible patch changes the masked positions' logits (full attention)
        r, c = divmod(v, 4)
        y = x.clone()
        y[0, :, r * 7 : (r + 1) * 7, c * 7 : (c + 1) * 7] += 1.0
        moved = method.predict(y, 0)
    n0 = int(masks[0].sum())
    assert not torch.allclose(moved["logits"][:n0], base["logits"][:n0])
    assert torch.equal(moved["logits"][n0:], base["logits"][n0:])  # image 1 untouched
    assert base["logits"].shape == (int(masks.sum()), 16) and torch.equal(base["target"], base["codes"][masks])
    assert float(net.mask_token.detach().std()) > 0  # re-initialised N(0, 0.02), not DINOv2's zeros


def test_tokenizer_is_frozen_and_monitors(tokenizer, tmp_path):
    method = _method(tokenizer)
    before = {k: v.clone() for k, v in method.arch.tokenizer.state_dict().items()}
    assert not method.arch.tokenizer.training
    x = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW([p for g in method.param_groups() for p in g["params"]], lr=1e-2)
    loss, out = method.compute_losses({"global_crops": x}, VALUES)
    loss.backward()
    opt.step()
    method.after_step(VALUES)
    assert int(method.arch.steps) == 1
    assert all(torch.equal(v, method.arch.tokenizer.state_dict()[k]) for k, v in before.items())
    names = {id(p): n for n, p in method.arch.named_parameters()}
    grouped = {names[id(p)] for g in method.param_groups() for p in g["params"]}
    assert not any(n.startswith("tokenizer.") for n in grouped) and "head.weight" in grouped
    m = method.monitor(out)
    assert set(m) == {"mim_accuracy", "majority_accuracy", "mask_fraction", "target_perplexity"}
    assert 0 <= m["mim_accuracy"] <= 1 and 0 < m["majority_accuracy"] <= 1 and 0 < m["mask_fraction"] <= 6 / 16
    assert 1 <= m["target_perplexity"] <= 16


def test_extreme_inputs_stay_finite(tokenizer):
    method = _method(tokenizer)
    with torch.no_grad():
        for p in method.arch.backbone.parameters():
            p.mul_(30.0)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for x in ((torch.zeros(8, 3, 28, 28) - mean) / std, (torch.ones(8, 3, 28, 28) - mean) / std,  # black, white
              1e6 * torch.randn(8, 3, 28, 28), torch.full((8, 3, 28, 28), -1e4)):
        method.arch.zero_grad()
        loss, out = method.compute_losses({"global_crops": x}, VALUES)
        loss.backward()
        assert torch.isfinite(loss) and math.isfinite(method.monitor(out)["target_perplexity"])
        assert all(torch.isfinite(p.grad).all() for p in method.arch.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- distributed
def _batches(n_steps: int, b: int = 8):
    g = torch.Generator().manual_seed(0)
    return [{"global_crops": torch.randn(2 * b, 3, 28, 28, generator=g)} for _ in range(n_steps)]


def _parity_run(rank: int, world: int, out: str, tok: str) -> dict:
    from pretrain.checkpoint import full_state_dict

    torch.set_num_threads(1)
    # SGD, as MAE's: Adam would turn ~1e-9 noise of exactly-zero gradients into lr-sized steps
    sets = _sets(tok, **{"data.shards.batch_size": 8 // world, "schedule.base_lr": "0.05",
                         "train.optimizer": '"sgd"'})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), out)
    phase = trainer.phases[0]
    losses = [trainer.train_step(slice_views(b, rank, world), step, phase)["loss"]
              for step, b in enumerate(_batches(3))]
    sd = full_state_dict(trainer.method.arch)
    return {"losses": losses, "model": {k: v.numpy().copy() for k, v in sd.items()} if rank == 0 else None}


def test_two_processes_equal_one(tmp_path, tokenizer):
    one = _parity_run(0, 1, str(tmp_path / "one"), tokenizer)
    two = run_distributed(_parity_run, str(tmp_path / "two"), tokenizer, world_size=2, timeout_s=300)
    # the loss is a sum over a rank's masked patches over the global count: the ranks' mean is the global mean
    np.testing.assert_allclose(np.mean([r["losses"] for r in two], axis=0), one["losses"], atol=1e-5, rtol=0)
    assert one["losses"][0] != one["losses"][2]
    assert int(one["model"]["steps"]) == int(two[0]["model"]["steps"]) == 3
    for k, v in one["model"].items():
        np.testing.assert_allclose(two[0]["model"][k], v, atol=1e-5, err_msg=k)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory, shards):
    """A tokenizer trained (6 steps) and exported by ``python -m pretrain train vqtok_tiny_cpu.toml``."""
    out = tmp_path_factory.mktemp("vqtok") / "run"
    sets = fast_sets(shards, SMALL_TOK)
    assert main([VQTOK, "--out", str(out), *[a for kv in sets for a in ("--set", kv)]]) == 0
    return str(out / "export")


def _train(out: Path, tok: str, urls: str, **extra: object) -> int:
    return main([TINY, "--out", str(out), *[a for kv in _sets(tok, urls, **extra) for a in ("--set", kv)]])


def test_tokenizer_trained_by_the_trainer_then_beit_resumes_bitwise_and_exports(tmp_path, shards, trained_tokenizer):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(straight, trained_tokenizer, shards) == 0
    assert _train(resumed, trained_tokenizer, shards, **{"train.stop_at": 3}) == 0
    assert _train(resumed, trained_tokenizer, shards) == 0
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 7)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "mim", "lr", "grad_norm/encoder", "grad_norm/head"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    assert a[0]["loss"] != a[-1]["loss"] and {"mim_accuracy", "majority_accuracy"} <= set(a[1])
    for name in ("backbone.pth", "head.pth"):
        sa, sb = (torch.load(d / "export" / name, weights_only=True) for d in (straight, resumed))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    meta = json.loads((straight / "export" / "backbone.pth.json").read_text())
    assert meta["method"] == "beit" and meta["beit"]["tokenizer"] == trained_tokenizer
    net = build_backbone("vit_test", weights=str(straight / "export" / "backbone.pth"), patch_size=7, img_size=28,
                         init_values=0).eval()
    trainer = Trainer(load_config(TrainConfig, TINY, _sets(trained_tokenizer, shards)), straight)
    assert trainer.resume() == 6
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(net(x), trainer.arch.backbone.eval()(x))
    head = torch.load(straight / "export" / "head.pth", weights_only=True)
    assert head["weight"].shape == (16, 32)
    # the frozen tokenizer in the BEiT run is the exported one
    exported = torch.load(Path(trained_tokenizer) / "tokenizer.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(v, trainer.arch.tokenizer.state_dict()[k]) for k, v in exported.items())


# ---------------------------------------------------------------------------------------------- it learns
@pytest.mark.slow
def test_fashion_mnist_run_predicts_the_tokenizers_codes(tmp_path):
    """A tokenizer of the tiny recipe (32 channels, 80 steps), then 100 steps of the tiny BEiT recipe (vit_mini,
    patch 4, 19 of 49 patches masked) on 512 Fashion-MNIST images, both through the trainer: the masked-code
    cross-entropy falls well below log K (uniform guessing) and the accuracy beats always predicting the batch's
    most frequent masked code."""
    shards = write_shards(tmp_path / "shards", n=512, per_shard=128)
    common = {"data.shards.batch_size": 32, "schedule.epoch_length": 20, "schedule.lr_reference_batch": 32,
              "train.log_every": 5, "train.monitor_every": 5, "train.checkpoint_every": 1000}
    tok_sets = fast_sets(shards, common, **{"schedule.epochs": 4, "vqtok.hidden_dim": 32})
    assert main([VQTOK, "--out", str(tmp_path / "tok"), *[a for kv in tok_sets for a in ("--set", kv)]]) == 0
    sets = fast_sets(shards, common, **{"schedule.epochs": 5, "schedule.warmup_epochs": 1,
                                        "beit.tokenizer": f'"{tmp_path / "tok" / "export"}"'})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), tmp_path / "run")
    assert trainer.fit() == 100
    metrics = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics]
    acc = [m["mim_accuracy"] for m in metrics]
    major = [m["majority_accuracy"] for m in metrics]
    print(f"losses {[round(x, 3) for x in losses]}; accuracy {[round(x, 3) for x in acc]}; most frequent code "
          f"{[round(x, 3) for x in major]}; target perplexity {[round(m['target_perplexity'], 1) for m in metrics]}")
    log_k = math.log(128)
    assert losses[0] > log_k - 0.3 and np.mean(losses[-4:]) < log_k - 0.8, losses
    assert np.mean(acc[-4:]) > 2 * np.mean(major[-4:]), (acc, major)
