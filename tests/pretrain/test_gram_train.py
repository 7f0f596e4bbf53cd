"""Gram anchoring in DINOv2 pretraining (DINOv3): the Gram teacher is the EMA teacher snapshot taken at
``gram_start`` and refreshed every ``gram_refresh_every`` iterations, checkpointed and resumed bitwise, sharded like
the teacher (2 gloo processes equal 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.train import TrainConfig, Trainer, main
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .test_train import PARITY, _shard_batch, _synthetic_batches
from .trainer_utils import tiny_overrides, write_shards

RECIPE = str(Path(__file__).resolve().parents[2] / "pretrain" / "recipes" / "tiny_cpu.toml")
GRAM = {"loss.gram_weight": "1.0", "loss.gram_start": "2", "loss.gram_refresh_every": "3"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=64, per_shard=32)


def _run(out: Path, urls: str, **extra) -> list[dict]:
    main([RECIPE, "--out", str(out), *[a for kv in tiny_overrides(urls, **GRAM, **extra) for a in ("--set", kv)]])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_gram_anchoring_schedule_and_bitwise_resume(tmp_path, shards):
    straight = _run(tmp_path / "a", shards)
    _run(tmp_path / "b", shards, **{"train.stop_at": 4})
    resumed = _run(tmp_path / "b", shards)
    assert [("gram" in m) for m in straight] == [False, False, True, True, True, True]  # from iteration 2 on
    assert all(np.isfinite(m["gram"]) for m in straight[2:])
    for x, y in zip(straight, resumed):
        assert x["loss"] == y["loss"] and x.get("gram") == y.get("gram"), x["step"]


def test_gram_teacher_is_a_refreshed_snapshot_of_the_teacher(tmp_path, shards):
    cfg = load_config(TrainConfig, RECIPE, tiny_overrides(shards, **GRAM))
    trainer = Trainer(cfg, tmp_path / "t")
    arch, phase = trainer.method.arch, trainer.phases[0]
    snaps = {}
    for step, batch in enumerate(_synthetic_batches(6)):
        trainer.train_step(_shard_batch(batch, 0, 1), step, phase)
        snaps[step] = ({k: v.clone() for k, v in arch.teacher.state_dict().items()},
                       {k: v.clone() for k, v in arch.gram_teacher.state_dict().items()})
    teacher_at = {s: t for s, (t, _) in snaps.items()}
    gram_at = {s: g for s, (_, g) in snaps.items()}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # iteration 2 starts it with the teacher after iteration 1; iterations 2-4 train against it; after
    # iteration 4 (3 iterations since the start) it takes the teacher of that moment
    assert same(gram_at[2], teacher_at[1]) and same(gram_at[3], teacher_at[1]) and not same(teacher_at[3],
                                                                                            teacher_at[1])
    assert same(gram_at[4], teacher_at[4]) and same(gram_at[5], teacher_at[4])


def _parity(rank: int, world: int, urls: str, out: str) -> list[float]:
    sets = tiny_overrides(urls, **PARITY, **{**GRAM, "data.shards.batch_size": 4 // world, "loss.koleo_weight": "0.0",
                                             "loss.gram_start": "1"})  # fmt: skip
    trainer = Trainer(load_config(TrainConfig, RECIPE, sets), out)
    phase = trainer.phases[0]
    return [trainer.train_step(_shard_batch(b, rank, world), s, phase)["gram"] if s >= 1 else 0.0
            for s, b in enumerate(_synthetic_batches(3))]  # fmt: skip


def test_gram_two_processes_equal_one(tmp_path, shards):
    single = _parity(0, 1, shards, str(tmp_path / "one"))
    ranks = run_distributed(_parity, shards, str(tmp_path / "two"), world_size=2, timeout_s=300)
    np.testing.assert_allclose(np.mean(ranks, axis=0), single, atol=1e-6, rtol=0)
    assert single[1] > 0
