"""SSL zoo: the whole self-supervised lineage pretrained side by side on curated Fashion-MNIST, then k-NN and a
linear probe on the full Fashion-MNIST splits.

Steps (every one resumable: a killed bench continues where it stopped):

1. **Curation.** ``--pool`` Fashion-MNIST *train* images (default all 60,000) are written as a raw pool (tar shards
   of ``<class>/<index>.png``) and curated by our pipeline (``curation`` recipe ``demo`` on an in-process Ray, with
   ``stages = ingest, embed, dedupe, cluster, shard``: no ``retrieve`` stage, so no seed set restricts the classes)
   : ingest -> embed (built-in descriptor) -> dedupe (cosine 0.96) -> hierarchical k-means (``pool // 300``
   then 10 clusters) + balanced sampling to ``--curated`` images (default: half the pool) -> WebDataset shards
   (PNG kept, ``cls`` from the class directory, used only by evaluation and the trainers' monitors). The funnel
   (in -> out of every stage) is printed and stored.
2. **Pretraining.** Each method's tiny CPU recipe (``pretrain/recipes/*_tiny_cpu.toml``) on the curated shards,
   one run per seed, with ``python -m pretrain train`` in a subprocess (``OMP_NUM_THREADS=--threads``). Equal
   budget: ``--images`` images seen per run (source images drawn from the shards; the multi-crop views of an image
   count once), at the same batch size for every method (``--batch``, default 64; every tiny recipe scales its lr
   with ``lr_reference_batch``). steps = images / batch rounded to whole epochs of the recipe's schedule
   (``schedule.epochs`` kept, ``schedule.epoch_length`` = steps / epochs, so step-lr milestones and warm-ups keep
   their place), ``phases = []`` (no high-resolution phase), tensorboard off, no intermediate checkpoints. Wall
   time and CPU time (``resource.getrusage(RUSAGE_CHILDREN)``: user + system of the trainer and its loader
   workers) are measured per run and printed as CPU-minutes.
3. **Evaluation** of each exported backbone, frozen, at the recipe's global crop size (28 px images resized up):
   weighted k-NN (cosine, k=20, T=0.07, DINO protocol) and a linear probe on the same features (the backbone
   output: CLS token of a ViT, pooled feature of a ResNet), with all 60,000 train images as the bank / probe
   train set and all 10,000 test images reported (``--eval-train`` / ``--eval-test`` for smoke runs: balanced
   heads of the splits). Linear probe: ``pretrain.eval.run_linear_probe``, SGD (momentum 0.9, batch 256,
   ``--probe-epochs`` 10 epochs, cosine lr) on features standardised with the train split's per-column mean and
   std, lr grid {1e-3, 1e-2, 1e-1, 1} chosen on a stratified 10% train hold-out, then refit on the whole train
   split and evaluated once on test (~30 s for 60k x 128-d features on one core). References: a random-init
   backbone per architecture (same seeds) and raw pixels (pixels / 255, k-NN and the same linear probe).
4. **Table**: medians over ``--seeds`` with [min-max], markdown to stdout, everything to ``<workdir>/zoo.json``.

Methods (lineage order) and their settings on top of the tiny recipe (ResNets: ``resnet18_small`` = ResNet-18
with a 3x3/1 stem and no max-pool, width 16; ViTs: ``vit_mini`` = 4 blocks, dim 96, LayerScale off):

==========  =========================  =========================================================================
name        recipe                     overrides / notes
==========  =========================  =========================================================================
instdisc    instdisc_tiny_cpu          ResNet; memory bank over every curated image, full softmax, T=0.07
invaspread  invaspread_tiny_cpu        ResNet; in-batch instance softmax, T=0.1
cpc         cpc_tiny_cpu               CPC v2 on a 3x3 grid of 14 px patches; eval feature = mean patch feature
cmc         cmc_tiny_cpu               ResNet per Lab view; eval feature = [f_L, f_ab]. Fashion-MNIST is
                                       grayscale: the ab view is constant, CMC has nothing to contrast (expect
                                       a degenerate result; it is the honest one on this data)
mocov1      moco_tiny_cpu              moco.version=1 (linear head), T=0.07, MoCo v1 augmentation (no blur,
                                       jitter 0.4 all four with p=1)
mocov2      moco_tiny_cpu              as the recipe (MLP head, T=0.2, blur)
mocov3      mocov3_tiny_cpu            ViT patch 7 at 28 px, frozen patch embedding
simclrv1    simclr_tiny_cpu            simclr.version=1, simclr.backbone_overrides={width=16} (the recipe's
                                       width 64 would be 16x the FLOPs of the other ResNets)
simclrv2    simclr_tiny_cpu            simclr.version=2 (3-layer head), width 16
swav        swav_tiny_cpu              ResNet, 2x28 + 2x14 px crops, 50 prototypes, queue from epoch 2
byol        byol_tiny_cpu              ResNet, target momentum 0.9 -> 1
simsiam     simsiam_tiny_cpu           ResNet
dino        tiny_cpu (method dinov2)   DINO = DINOv2 without iBOT and KoLeo: loss.ibot_weight=0,
                                       loss.koleo_weight=0, loss.centering="softmax" (EMA centering,
                                       loss.center_momentum=0.9), no masks (data.masking.mask_probability=0),
                                       teacher temperature 0.04 -> 0.07 over 2 epochs (DINO's warm-up)
ibot        tiny_cpu (method dinov2)   iBOT = DINO + the masked-patch loss: loss.ibot_weight=1, koleo 0,
                                       softmax centering, the recipe's masks (p=0.5), temperatures as DINO
beit        vqtok_tiny_cpu, then       BEiT: a VQ tokenizer trained first on the same shards and seed, then
            beit_tiny_cpu              beit.tokenizer = its export. Budget: the tokenizer's images count in
                                       BEiT's: 1/5 of --images go to the tokenizer, the rest to BEiT (each
                                       rounded to whole epochs); CPU time = both runs
mae         mae_tiny_cpu               ViT patch 4 at 28 px, 75% masking
dinov2      tiny_cpu                   as the recipe (DINO + iBOT + KoLeo, Sinkhorn), 56 px global crops
==========  =========================  =========================================================================

Exports evaluated: ``export/backbone.pth`` (query / online encoder) for every method but the DINOv2 family, whose
EMA teacher ``export/teacher.pth`` is evaluated (as the papers).

Usage::

    python bench/ssl_zoo.py --workdir /tmp/zoo                                   # everything (hours: see below)
    python bench/ssl_zoo.py --workdir /tmp/zoo --methods simclrv1 dinov2 --seeds 0
    python bench/ssl_zoo.py --workdir /tmp/zoo_smoke --methods simclrv1 dinov2 --seeds 0 --images 480 \\
        --batch 16 --pool 2000 --eval-train 2000 --eval-test 1000

Cost, measured on this 2-core VM shared with another heavy job, ``--threads 1``: curating the 60,000-image pool
took 941 s (ingest 60000 -> embed 60000 -> dedupe 58753 -> balanced 30000 -> shards); one tiny DINOv2 run at the
default budget (468 steps x 64 = 29,952 images) 702 s wall / 707 CPU-s (11.8 CPU-min); its evaluation on
60,000 + 10,000 images at 56 px (extraction, k-NN, probe) 165 s. 30-step smoke runs at batch 64 cost 0.3-0.6
CPU-min for the ResNet methods (start-up included), so a ResNet run at the default budget is ~5-10 CPU-min. The
full zoo (17 methods x 3 seeds, 4 random-init architectures x 3 seeds, pixels) is therefore ~8-11 hours wall:
~7 h of pretraining, ~2.5 h of evaluation, 16 min of curation.

A run directory holding ``export/`` and a ``bench_request.json`` with the same recipe text and overrides is
reused; one with other settings stops the bench with a clear error (delete it or use another ``--workdir``).
Evaluations are cached per run as ``eval-<train>-<test>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "pretrain" / "recipes"
log = logging.getLogger("ssl_zoo")

RESNET = 'backbone.overrides={width = 16}'
#: DINO's teacher temperature warm-up (0.04 -> 0.07) with EMA softmax centering (tiny_cpu.toml's 0.02 is for
#: Sinkhorn targets).
DINO_TEMPS = ["schedule.warmup_teacher_temp=0.04", "schedule.teacher_temp=0.07",
              "schedule.warmup_teacher_temp_epochs=2", 'loss.centering="softmax"', "loss.center_momentum=0.9",
              "loss.koleo_weight=0"]


@dataclass(frozen=True)
class Method:
    """One row of the zoo: which recipe, which overrides, which export and how its features are read."""

    name: str
    paper: str
    recipe: str
    arch: str
    """Backbone, as printed in the table."""
    overrides: tuple[str, ...] = ()
    export: str = "backbone.pth"
    features: str = "plain"
    """``plain`` (backbone(x)), ``cmc`` ([f_L, f_ab] of the Lab views) or ``cpc`` (mean patch feature)."""
    random_init: tuple[str, tuple[tuple[str, Any], ...], int] | None = None
    """(name, overrides, eval size) of the architecture's random-init reference row."""
    extra: dict[str, Any] = field(default_factory=dict)


RN = ("resnet18_small", (("width", 16),), 28)
VIT7_28 = ("vit_mini", (("patch_size", 7), ("img_size", 28), ("init_values", 0)), 28)
VIT4_28 = ("vit_mini", (("patch_size", 4), ("img_size", 28), ("init_values", 0)), 28)
VIT7_56 = ("vit_mini", (("patch_size", 7), ("img_size", 56), ("init_values", 0)), 56)

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("instdisc", "Wu et al. 2018", "instdisc_tiny_cpu", "resnet18_small w16", (RESNET,), random_init=RN),
    Method("invaspread", "Ye et al. 2019", "invaspread_tiny_cpu", "resnet18_small w16", (RESNET,), random_init=RN),
    Method("cpc", "Henaff et al. 2019 (CPC v2)", "cpc_tiny_cpu", "resnet18_small w16 LN (patches)",
           ("cpc.backbone_overrides={width = 16}",), features="cpc", random_init=RN),
    Method("cmc", "Tian et al. 2019", "cmc_tiny_cpu", "2x resnet18_small w16 (L, ab)", (RESNET,), features="cmc",
           random_init=RN),
    Method("mocov1", "He et al. 2019", "moco_tiny_cpu", "resnet18_small w16",
           (RESNET, "moco.version=1", "moco.temperature=0.07", "data.crops.jitter_p=1.0", "data.crops.hue=0.4",
            "data.crops.blur_p_global1=0.0", "data.crops.blur_p_global2=0.0"), random_init=RN),
    Method("mocov2", "Chen et al. 2020 (MoCo v2)", "moco_tiny_cpu", "resnet18_small w16",
           (RESNET, "moco.version=2"), random_init=RN),
    Method("mocov3", "Chen et al. 2021 (MoCo v3)", "mocov3_tiny_cpu", "vit_mini p7 @28", random_init=VIT7_28),
    Method("simclrv1", "Chen et al. 2020 (SimCLR)", "simclr_tiny_cpu", "resnet18_small w16",
           ("simclr.version=1", "simclr.backbone_overrides={width = 16}"), random_init=RN),
    Method("simclrv2", "Chen et al. 2020 (SimCLR v2)", "simclr_tiny_cpu", "resnet18_small w16",
           ("simclr.version=2", "simclr.backbone_overrides={width = 16}"), random_init=RN),
    Method("swav", "Caron et al. 2020", "swav_tiny_cpu", "resnet18_small w16", (RESNET,), random_init=RN),
    Method("byol", "Grill et al. 2020", "byol_tiny_cpu", "resnet18_small w16", (RESNET,), random_init=RN),
    Method("simsiam", "Chen & He 2021", "simsiam_tiny_cpu", "resnet18_small w16", (RESNET,), random_init=RN),
    Method("dino", "Caron et al. 2021", "tiny_cpu", "vit_mini p7 @56",
           ("loss.ibot_weight=0", "data.masking.mask_probability=0.0", *DINO_TEMPS), export="teacher.pth",
           random_init=VIT7_56),
    Method("ibot", "Zhou et al. 2022", "tiny_cpu", "vit_mini p7 @56", ("loss.ibot_weight=1.0", *DINO_TEMPS),
           export="teacher.pth", random_init=VIT7_56),
    Method("beit", "Bao et al. 2022", "beit_tiny_cpu", "vit_mini p4 @28", random_init=VIT4_28),
    Method("mae", "He et al. 2022", "mae_tiny_cpu", "vit_mini p4 @28", random_init=VIT4_28),
    Method("dinov2", "Oquab et al. 2023", "tiny_cpu", "vit_mini p7 @56", export="teacher.pth", random_init=VIT7_56),
]}
#: Share of a BEiT run's images spent on its tokenizer (vqtok_tiny_cpu).
BEIT_TOKENIZER_SHARE = 0.2
PROBE_LRS = [1e-3, 1e-2, 1e-1, 1.0]


# ---------------------------------------------------------------------------------------------------- curation
def write_pool(pool_dir: Path, n: int, seed: int = 0) -> int:
    """``n`` Fashion-MNIST train images (a seeded random subset; all of them for 60000) as tar shards of
    ``<class>/<index>.png``: the uncurated pool. Returns the number written."""
    from PIL import Image

    from curation.demo import CLASSES
    from pretrain.eval.fashion_mnist import load_fashion_mnist

    x, y = load_fashion_mnist("train", balanced=False)
    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
    pool_dir.mkdir(parents=True, exist_ok=True)
    per = 10_000
    for s in range(0, len(idx), per):
        path = pool_dir / f"pool-{s // per:06d}.tar"
        with tarfile.open(str(path) + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in idx[s:s + per].tolist():
                buf = io.BytesIO()
                Image.fromarray(x[i]).save(buf, format="PNG")
                info = tarfile.TarInfo(f"{CLASSES[y[i]]}/{i:05d}.png")
                info.size, info.mtime, info.mode = buf.tell(), 0, 0o644
                buf.seek(0)
                tf.addfile(info, buf)
        os.replace(str(path) + ".tmp", path)
    return len(idx)


def curate(work: Path, pool: int, curated: int, threads: int, ray_address: str = "") -> dict[str, Any]:
    """Curate ``pool`` Fashion-MNIST train images to ``curated`` balanced samples (see the module docstring);
    returns ``{"urls", "count", "funnel", "seconds"}`` (cached in ``curation.json``)."""
    done = work / "curation.json"
    request = {"pool": pool, "curated": curated}
    if done.exists():
        res = json.loads(done.read_text())
        if res["request"] != request:
            raise SystemExit(f"{work} holds a curation of {res['request']}, not {request}: use another --workdir")
        return res
    from curation.cli import load_run_config
    from curation.io.fs import atomic_write_bytes, join, read_json
    from curation.ray import executor_for
    from curation.stages import run_stages
    from pretrain.utils.config import dump_toml, to_dict

    t0 = time.perf_counter()
    pool_dir = work / "pool"
    if not (pool_dir / "done").exists():
        log.info("writing the raw pool: %d Fashion-MNIST train images", pool)
        write_pool(pool_dir, pool)
        (pool_dir / "done").write_text(str(pool))
    n1 = max(10, pool // 300)
    levels = (f"[{{n_clusters = {n1}, n_resampling_steps = 3, sample_size = 40, init = \"kmeans++\"}}, "
              f"{{n_clusters = 10, n_resampling_steps = 2, sample_size = 2, init = \"kmeans++\"}}]")
    config = load_run_config("demo", [
        'stages=["ingest", "embed", "dedupe", "cluster", "shard"]', f'ingest.sources=["{pool_dir}"]',
        f"cluster.target_size={curated}", f"cluster.levels={levels}", 'shard.prefix="zoo"',
        'shard.reencode="never"', 'shard.selection="balanced"', f"ray.num_cpus={max(2, threads)}", "seed=0",
    ], ray_address or None)
    run_dir = str(work / "curation")
    atomic_write_bytes(join(run_dir, "config.toml"), dump_toml(to_dict(config)).encode())
    with executor_for(config.ray) as executor:
        records = run_stages(config, run_dir, executor)
    index = read_json(join(run_dir, "shards", "index.json"))
    funnel = {name: {k: rec.get(k) for k in ("in", "out", "rejected")} for name, rec in records.items()}
    res = {"request": request, "urls": join(run_dir, "shards", index["pattern"]), "count": int(index["count"]),
           "labelled": int(index.get("labelled", index["count"])), "funnel": funnel,
           "seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------------------------------------------- training
def recipe_epochs(recipe: str) -> int:
    """``schedule.epochs`` of a recipe."""
    with open(RECIPES / f"{recipe}.toml", "rb") as f:
        return int(tomllib.load(f)["schedule"]["epochs"])


def plan_steps(images: int, batch: int, epochs: int) -> int:
    """Steps for ``images`` images seen at ``batch``, rounded to whole epochs of ``epochs`` (at least one step
    per epoch)."""
    return max(1, round(images / (batch * epochs))) * epochs


def common_sets(urls: str, batch: int, steps: int, epochs: int, seed: int) -> list[str]:
    """Overrides every run gets: the curated shards, batch, schedule, seed, no tensorboard or checkpoints."""
    return [f'data.shards.urls=["{urls}"]', f"data.shards.batch_size={batch}", "data.shards.num_workers=1",
            "data.shards.shuffle_buffer=1000", f"schedule.epoch_length={steps // epochs}",
            f"schedule.epochs={epochs}", "phases=[]", f"seed={seed}", "train.tensorboard=false",
            f"train.checkpoint_every={10 * steps}", 'train.precision="fp32"']


def train_run(recipe: str, out: Path, sets: list[str], threads: int) -> dict[str, float]:
    """``python -m pretrain train`` in a subprocess, or the finished run of the same request; returns its wall
    and CPU seconds (as measured when it ran) and ``reused``."""
    request = json.dumps({"recipe": (RECIPES / f"{recipe}.toml").read_text(), "sets": sets}, indent=1)
    if (out / "export").is_dir():
        done = out / "bench_request.json"
        if not done.exists() or done.read_text() != request:
            raise SystemExit(f"{out} holds a finished run of another recipe or other settings; delete it or use "
                             "another --workdir")
        cost = json.loads((out / "cost.json").read_text())
        return {**cost, "reused": True}
    argv = [sys.executable, "-m", "pretrain", "train", str(RECIPES / f"{recipe}.toml"), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as logf:
        proc = subprocess.run(argv, env=env, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (out / "train.log").read_text()[-3000:]
        raise RuntimeError(f"{out}: training failed (exit {proc.returncode}):\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cost = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    (out / "cost.json").write_text(json.dumps(cost))
    (out / "bench_request.json").write_text(request)
    return {**cost, "reused": False}


def pretrain_method(m: Method, seed: int, urls: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train one method at one seed (BEiT: its tokenizer first); returns run dir, images seen, steps and cost."""
    run = work / "runs" / f"{m.name}-s{seed}"
    if m.name == "beit":
        tok_epochs, epochs = recipe_epochs("vqtok_tiny_cpu"), recipe_epochs("beit_tiny_cpu")
        tok_steps = plan_steps(round(args.images * BEIT_TOKENIZER_SHARE), args.batch, tok_epochs)
        steps = plan_steps(args.images - tok_steps * args.batch, args.batch, epochs)
        tok_run = work / "runs" / f"beit-tokenizer-s{seed}"
        tok = train_run("vqtok_tiny_cpu", tok_run, common_sets(urls, args.batch, tok_steps, tok_epochs, seed),
                        args.threads)
        sets = common_sets(urls, args.batch, steps, epochs, seed) + [f'beit.tokenizer="{tok_run / "export"}"']
        cost = train_run(m.recipe, run, sets, args.threads)
        return {"run": str(run), "steps": tok_steps + steps, "images": (tok_steps + steps) * args.batch,
                "tokenizer_images": tok_steps * args.batch, "wall_s": tok["wall_s"] + cost["wall_s"],
                "cpu_s": tok["cpu_s"] + cost["cpu_s"], "reused": cost["reused"] and tok["reused"]}
    epochs = recipe_epochs(m.recipe)
    steps = plan_steps(args.images, args.batch, epochs)
    cost = train_run(m.recipe, run, common_sets(urls, args.batch, steps, epochs, seed) + list(m.overrides),
                     args.threads)
    return {"run": str(run), "steps": steps, "images": steps * args.batch, **cost}


# -------------------------------------------------------------------------------------------------- evaluation
class CMCFeatures(nn.Module):
    """CMC's evaluation feature: [f_L(L view), f_ab(ab view)] of the Lab conversion of the RGB input."""

    def __init__(self, l_net: nn.Module, ab_net: nn.Module) -> None:
        super().__init__()
        self.l_net, self.ab_net = l_net, ab_net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pretrain.methods.cmc import lab_views

        view_l, view_ab = lab_views(x)
        return torch.cat([self.l_net(view_l), self.ab_net(view_ab)], dim=1)


class CPCFeatures(nn.Module):
    """CPC v2's evaluation feature: the mean of the patch encoder's features over the patch grid."""

    def __init__(self, backbone: nn.Module, grid: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.backbone, self.grid, self.patch_size, self.stride = backbone, grid, patch_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pretrain.methods.cpc import patch_grid_features

        return patch_grid_features(self.backbone, x, self.grid, self.patch_size, self.stride)


def load_trained(m: Method, run: Path) -> nn.Module:
    """The exported backbone of a finished run, wrapped for the method's evaluation feature."""
    from pretrain.models import build_backbone

    export = run / "export"
    if m.features == "cmc":
        model: nn.Module = CMCFeatures(build_backbone(None, weights=str(export / "backbone.pth")),
                                       build_backbone(None, weights=str(export / "ab_backbone.pth")))
    elif m.features == "cpc":
        meta = json.loads((export / "backbone.pth.json").read_text())  # the sidecar holds the patch grid
        model = CPCFeatures(build_backbone(None, weights=str(export / "backbone.pth")), int(meta["grid"]),
                            int(meta["patch_size"]), int(meta["stride"]))
    else:
        model = build_backbone(None, weights=str(export / m.export))
    return model.eval().requires_grad_(False)


def eval_data(work: Path, n_train: int, n_test: int) -> tuple[str, str]:
    """Fashion-MNIST train (bank / probe train) and test shards of the requested sizes (balanced heads; all of a
    split at its full size), written once per work directory."""
    from pretrain.eval.fashion_mnist import load_fashion_mnist, write_shards

    data = work / "eval_data"
    data.mkdir(parents=True, exist_ok=True)
    urls = []
    for split, n in (("train", n_train), ("test", n_test)):
        prefix = f"{split}{n}"
        count = (n + 9999) // 10000
        if not (data / f"{prefix}.done").exists():
            x, y = load_fashion_mnist(split, n)
            write_shards(x, y, str(data / f"{prefix}-%06d.tar"), maxcount=10000)
            (data / f"{prefix}.done").write_text(str(n))
        urls.append(str(data / f"{prefix}-{{000000..{count - 1:06d}}}.tar"))
    return urls[0], urls[1]


def probe_config(args: argparse.Namespace) -> Any:
    from pretrain.eval import LinearConfig

    return LinearConfig(learning_rates=PROBE_LRS, epochs=args.probe_epochs, batch_size=256, n_last_blocks=1,
                        device="cpu", seed=0)


def evaluate_features(train: Any, test: Any, args: argparse.Namespace) -> dict[str, float]:
    """k-NN top-1 at k=20 (T=0.07) and linear-probe test top-1 of two FeatureSets (fractions in [0, 1])."""
    from pretrain.eval import KnnConfig, knn_evaluate, run_linear_probe

    knn = knn_evaluate(train, test, KnnConfig(ks=[20], temperature=0.07), device="cpu")
    # the probe sees standardised features (train mean / std per column): one lr grid fits every method's scale
    mean, std = train.features.mean(0), train.features.std(0).clamp_min(1e-6)
    train, test = (dataclasses.replace(fs, features=(fs.features - mean) / std) for fs in (train, test))
    lin = run_linear_probe(train, lambda: test, probe_config(args))
    return {"knn20": float(knn.top1[0]), "linear": float(lin.test_top1), "probe_lr": float(lin.selection.lr)}


def evaluate_model(model: nn.Module, size: int, urls: tuple[str, str], cache: Path,
                   args: argparse.Namespace) -> dict[str, float]:
    """Evaluate a frozen model at ``size`` px (cached in ``cache``)."""
    if cache.exists():
        return json.loads(cache.read_text())
    from pretrain.eval import DataConfig, ExtractConfig, extract_split

    t0 = time.perf_counter()
    data = DataConfig(train=urls[0], test=urls[1], image_size=size, resize_size=size)
    extract = ExtractConfig(batch_size=256, num_workers=0, device="cpu", precision="fp32")
    train = extract_split(model, data, extract, "train", mode="cls")
    test = extract_split(model, data, extract, "test", mode="cls", classes=train.classes)
    res = {**evaluate_features(train, test, args), "eval_s": round(time.perf_counter() - t0, 1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(res))
    return res


def eval_size(m: Method) -> int:
    """The recipe's global crop size (the eval image size)."""
    with open(RECIPES / f"{m.recipe}.toml", "rb") as f:
        return int(tomllib.load(f)["data"]["crops"]["global_size"])


def evaluate_pixels(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Raw pixels / 255 (784-d): k-NN (as bench/ssl_sanity.py's pixel_knn_top1) and the same linear probe."""
    cache = work / "evals" / f"pixels-{args.eval_train}-{args.eval_test}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from pretrain.eval import FeatureSet
    from pretrain.eval.fashion_mnist import load_fashion_mnist

    sets = []
    for split, n in (("train", args.eval_train), ("test", args.eval_test)):
        x, y = load_fashion_mnist(split, n)
        feats = torch.from_numpy(x.reshape(len(x), -1).astype("float32") / 255)
        sets.append(FeatureSet(features=feats, labels=torch.from_numpy(y), keys=[str(i) for i in range(len(y))],
                               mode="cls", embed_dim=feats.shape[1]))
    res = evaluate_features(sets[0], sets[1], args)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(res))
    return res


# ----------------------------------------------------------------------------------------------------- table
def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt_acc(s: dict[str, float] | None, n: int) -> str:
    if s is None:
        return "-"
    text = f"{100 * s['median']:.2f}"
    return text + (f" [{100 * s['min']:.2f}-{100 * s['max']:.2f}]" if n > 1 else "")


def markdown_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = ["method", "paper", "backbone", "images seen", "CPU-min (median)", "k-NN@20 median [min-max]",
            "linear median [min-max]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        n = r.get("n", 1)
        cpu = f"{r['cpu_min']['median']:.1f}" if r.get("cpu_min") else "-"
        images = f"{r['images']:,}" if r.get("images") else "-"
        lines.append("| " + " | ".join([r["method"], r.get("paper", ""), r.get("backbone", ""), images, cpu,
                                        fmt_acc(r.get("knn20"), n), fmt_acc(r.get("linear"), n)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="pool, curation, runs, evaluations and zoo.json go here")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--images", type=int, default=30000, help="images seen per run (rounded to whole epochs)")
    p.add_argument("--batch", type=int, default=64, help="images per step, every method")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP threads of each trainer and torch threads of the evaluation (1: on a shared 2-core box "
                        "2 threads made the linear probe 13x slower)")
    p.add_argument("--ray", default="", help='Ray address of the curation ("" = in-process Ray, "none" = no Ray)')
    p.add_argument("--pool", type=int, default=60000, help="Fashion-MNIST train images entering the curation")
    p.add_argument("--curated", type=int, default=0, help="balanced sample size (default: half of --pool)")
    p.add_argument("--eval-train", type=int, default=60000, help="train images forming the k-NN bank / probe train")
    p.add_argument("--eval-test", type=int, default=10000, help="test images evaluated")
    p.add_argument("--probe-epochs", type=int, default=10, help="linear-probe epochs")
    p.add_argument("--json", default=None, help="output JSON (default <workdir>/zoo.json)")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    if not 10 <= args.pool <= 60000:
        p.error("--pool must be in 10..60000")
    args.curated = args.curated or args.pool // 2
    if not 1 <= args.eval_train <= 60000 or not 1 <= args.eval_test <= 10000:
        p.error("--eval-train must be in 1..60000 and --eval-test in 1..10000")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    methods = [METHODS[n] for n in METHODS if n in args.methods]  # lineage order

    cur = curate(work, args.pool, args.curated, args.threads, args.ray)
    funnel = " -> ".join(f"{k} {v['out']}" for k, v in cur["funnel"].items())
    print(f"curation: {args.pool} Fashion-MNIST train images -> {cur['count']} curated ({funnel}; "
          f"{cur['seconds']:.0f} s)", flush=True)
    urls = eval_data(work, args.eval_train, args.eval_test)

    runs: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    failed: dict[str, str] = {}
    jobs = [(m, s) for m in methods for s in args.seeds]
    bar = tqdm(jobs, desc="zoo", unit="run")
    for m, seed in bar:
        bar.set_postfix_str(f"{m.name} seed {seed}")
        if m.name in failed:
            continue
        try:
            r = pretrain_method(m, seed, cur["urls"], args, work)
            model = load_trained(m, Path(r["run"]))
            cache = Path(r["run"]) / f"eval-{args.eval_train}-{args.eval_test}.json"
            r.update(evaluate_model(model, eval_size(m), urls, cache, args), seed=seed)
        except RuntimeError as e:
            log.error("%s seed %d failed: %s", m.name, seed, e)
            failed[m.name] = str(e).splitlines()[0]
            continue
        runs[m.name].append(r)
        tqdm.write(f"{m.name} seed {seed}: {r['images']} images, {r['wall_s'] / 60:.1f} min wall, "
                   f"{r['cpu_s'] / 60:.1f} CPU-min{' (reused)' if r.get('reused') else ''}; k-NN@20 "
                   f"{100 * r['knn20']:.2f}%, linear {100 * r['linear']:.2f}%")

    from pretrain.models import build_backbone

    refs: dict[tuple, list[dict[str, Any]]] = {}
    for m in methods:
        if m.random_init is None or m.random_init in refs:
            continue
        name, over, size = m.random_init
        refs[m.random_init] = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = build_backbone(name, **dict(over)).eval().requires_grad_(False)
            tag = "-".join(f"{k}{v}" for k, v in over)
            cache = work / "evals" / f"random-{name}-{tag}-{size}px-s{seed}-{args.eval_train}-{args.eval_test}.json"
            refs[m.random_init].append(evaluate_model(model, size, urls, cache, args))
    pixels = evaluate_pixels(args, work)

    rows: list[dict[str, Any]] = []
    for m in methods:
        rs = runs[m.name]
        row: dict[str, Any] = {"method": m.name, "paper": m.paper, "backbone": m.arch, "recipe": m.recipe,
                               "overrides": list(m.overrides), "n": len(rs), "runs": rs}
        if rs:
            row.update(images=rs[0]["images"], steps=rs[0]["steps"], batch=args.batch,
                       cpu_min=spread([r["cpu_s"] / 60 for r in rs]), wall_min=spread([r["wall_s"] / 60 for r in rs]),
                       knn20=spread([r["knn20"] for r in rs]), linear=spread([r["linear"] for r in rs]))
        else:
            row["failed"] = failed.get(m.name, "not run")
        rows.append(row)
    for (name, over, size), rs in refs.items():
        label = f"random init ({name} {', '.join(f'{k}={v}' for k, v in over)} @{size})"
        rows.append({"method": label, "backbone": name, "n": len(rs), "runs": rs,
                     "knn20": spread([r["knn20"] for r in rs]), "linear": spread([r["linear"] for r in rs])})
    rows.append({"method": "raw pixels", "backbone": "784 pixels / 255", "n": 1,
                 "knn20": spread([pixels["knn20"]]), "linear": spread([pixels["linear"]])})

    table = markdown_table(rows, args)
    print(f"\nFashion-MNIST: k-NN (cosine, k=20, T=0.07) and linear probe (SGD, {args.probe_epochs} epochs, lr grid "
          f"{PROBE_LRS} on a 10% hold-out, refit) top-1 %, {args.eval_train} train / {args.eval_test} test images; "
          f"pretraining on {cur['count']} curated images, {args.images} images seen per run (batch {args.batch}), "
          f"medians of seeds {args.seeds} [min-max]\n")
    print(table)
    for name, why in failed.items():
        print(f"\n{name} failed: {why}")
    out = Path(args.json) if args.json else work / "zoo.json"
    out.write_text(json.dumps({"args": vars(args), "curation": cur, "rows": rows, "failed": failed,
                               "table": table}, indent=1))
    print(f"\n(written to {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
