"""Every method of the lineage (issues 15 and 16) trains from its tiny recipe through ``python -m pretrain train``
under a real ``torchrun`` with 2 gloo processes (rendezvous on 127.0.0.1), checkpoints and exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_beit import write_tokenizer
from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
#: stands for the path of the ``tokenizer`` fixture's export (BEiT's frozen tokenizer)
TOKENIZER = "@TOKENIZER@"
#: tiny recipe -> overrides shrinking its networks (the per-method tests use the same ones)
METHODS = {
    "simclr_tiny_cpu": {"simclr.backbone": '"resnet_test"'},
    "moco_tiny_cpu": {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "moco.queue_size": 16,
                      "moco.dim": 16},
    "mocov3_tiny_cpu": {"backbone.name": '"vit_test"', "mocov3.dim": 16, "mocov3.mlp_dim": 32,
                        "backbone.overrides": "{patch_size = 7, img_size = 28, init_values = 0}"},
    "instdisc_tiny_cpu": {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "instdisc.dim": 16,
                          "instdisc.loss": '"nce"', "instdisc.noise": 8},
    "invaspread_tiny_cpu": {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "invaspread.dim": 16},
    "cpc_tiny_cpu": {"cpc.backbone": '"resnet_test"', "cpc.backbone_overrides": "{}", "cpc.context_dim": 16},
    "cmc_tiny_cpu": {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "cmc.dim": 16,
                     "cmc.num_negatives": 8},
    "byol_tiny_cpu": {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "byol.dim": 16, "byol.mlp_dim": 32},
    "simsiam_tiny_cpu": {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "simsiam.dim": 16,
                         "simsiam.pred_dim": 8},
    "swav_tiny_cpu": {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "swav.hidden_dim": 16,
                      "swav.out_dim": 8, "swav.n_prototypes": 10, "swav.queue_size": 8,
                      "swav.queue_start_epoch": 0, "swav.freeze_prototypes_iters": 1},
    "mae_tiny_cpu": {"backbone.name": '"vit_test"', "mae.decoder_dim": 16, "mae.decoder_depth": 1,
                     "mae.decoder_heads": 2, "backbone.overrides": "{patch_size = 7, img_size = 28, init_values = 0}"},
    "vqtok_tiny_cpu": {"vqtok.patch_size": 7, "vqtok.codebook_size": 16, "vqtok.code_dim": 4, "vqtok.hidden_dim": 8},
    "beit_tiny_cpu": {"backbone.name": '"vit_test"', "beit.num_mask_patches": 6, "beit.min_block_patches": 2,
                      "backbone.overrides": "{patch_size = 7, img_size = 28, init_values = 0}",
                      "beit.tokenizer": TOKENIZER},
}
#: what a run exports when it is not ``backbone.pth``
EXPORTS = {"vqtok_tiny_cpu": "tokenizer.pth"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=32, per_shard=16)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A vqtok export with 7 px codes (BEiT's targets on the 4 x 4 grid of vit_test at 28 px)."""
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("recipe", sorted(METHODS))
def test_method_trains_under_torchrun_with_two_gloo_processes(recipe, shards, tokenizer, tmp_path):
    sets = {"data.shards.urls": f'["{shards}"]', "data.shards.batch_size": 4, "data.shards.num_workers": 0,
            "data.shards.shuffle_buffer": 8, "schedule.epoch_length": 2, "schedule.epochs": 2,
            "schedule.warmup_epochs": 0, "schedule.lr_reference_batch": 8, "train.log_every": 1,
            "train.checkpoint_every": 2, "train.tensorboard": "false", "train.precision": '"fp32"',
            **{k: f'"{tokenizer}"' if v == TOKENIZER else v for k, v in METHODS[recipe].items()}}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", "--max_restarts=0",
           "-m", "pretrain", "train", str(RECIPES / f"{recipe}.toml"), "--out", str(out)]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DINOFORGE_DIST_INIT_METHOD": ""}
    env.pop("DINOFORGE_DIST_INIT_METHOD")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["loss"] == m["loss"] and abs(m["loss"]) < 1e6 for m in metrics)  # finite
    config = (out / "config.toml").read_text()
    assert f'method = "{recipe.removesuffix("_tiny_cpu")}"' in config
    assert (out / "export" / EXPORTS.get(recipe, "backbone.pth")).exists() and any((out / "checkpoints").iterdir())
    assert "2 processes" in done.stderr
