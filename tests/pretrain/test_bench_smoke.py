"""Smoke tests of bench/train_step.py and bench/ssl_sanity.py on tiny settings (figures, not timings)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "pretrain" / "recipes" / "tiny_cpu.toml")
#: vit_test (dim 32, depth 2) at 28 / 14 px with small heads: seconds per step even on a loaded machine.
TINY_SETS = ['backbone.name="vit_test"', "backbone.overrides={patch_size = 7, img_size = 28}",
             "data.crops.global_size=28", "data.crops.local_size=14", "heads.out_dim=64", "heads.hidden_dim=32",
             "heads.bottleneck_dim=16"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train_step = _load("train_step")
ssl_sanity = _load("ssl_sanity")


def test_synthetic_batch_is_shaped_like_the_collate_output():
    from pretrain.data.masking import MaskingConfig

    b = train_step.synthetic_batch(3, 4, 56, 28, 7, MaskingConfig(), seed=0)
    assert b["global_crops"].shape == (6, 3, 56, 56)
    assert b["local_crops"].shape == (12, 3, 28, 28)
    assert b["masks"].shape == (6, 64) and b["masks"].dtype == torch.bool
    assert torch.equal(b["mask_indices"], b["masks"].flatten().nonzero().flatten())
    assert int(b["n_masked_patches"]) == b["mask_indices"].numel() <= b["upperbound"]
    masked_images = int(b["masks"].any(dim=1).sum())
    assert masked_images == 3  # half of the 2B global crops
    assert math.isclose(float(b["masks_weight"].sum()), masked_images, rel_tol=1e-6)  # 1 / m_b per patch


def test_train_step_bench_prints_a_row_per_precision(capsys, tmp_path):
    out = tmp_path / "rows.json"
    rows = train_step.main(["--recipe", TINY, "--models", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1",
                            "--precisions", "fp32", "bf16", "--device", "cpu", "--threads", "1", "--n-local", "2",
                            "--json", str(out), *[a for s in TINY_SETS for a in ("--set", s)]])
    text = capsys.readouterr().out
    assert [r["precision"] for r in rows] == ["fp32", "bf16"], text
    for r in rows:
        assert (r["global_size"], r["local_size"], r["n_local"]) == (28, 14, 2)
        assert len(r["step_times"]) == 2 and r["s_per_step"] > 0
        assert r["min_img_per_s"] <= r["img_per_s"] <= r["max_img_per_s"]
        assert r["peak_mb"] > 10 and math.isfinite(r["loss"]) and r["mfu"] is None  # no MFU on CPU
        assert 0.01 < r["params_m"] < 1.0
    assert "tiny     fp32" in text and "tiny     bf16" in text and "2x28+2x14" in text
    assert len(json.loads(out.read_text())) == 2


def test_loss_curve_windows_and_verdict():
    records = [{"step": s, "loss": 10.0 - 0.1 * s, "dino": 1.0, "lr": 1e-3, "teacher_temp": 0.04, "img_per_s": 5.0}
               for s in range(1, 11)]
    curve = ssl_sanity.loss_curve(records, 4)
    assert [r["steps"] for r in curve] == ["1-4", "5-8", "9-10"]
    assert curve[0]["loss"] == pytest.approx(np.mean([9.9, 9.8, 9.7, 9.6]))
    log_k = math.log(64)
    healthy = {"teacher_entropy": 2.0, "teacher_marginal_entropy": 4.0, "effective_rank": 6.0,
               "embedding_std": 0.05}
    assert all(ok for _, ok, _ in ssl_sanity.verdict(curve, healthy, healthy, log_k))
    sharp = {**healthy, "teacher_entropy": 0.01, "teacher_marginal_entropy": 0.02}
    uniform = {**healthy, "teacher_entropy": 0.99 * log_k}
    flat = {**healthy, "effective_rank": 1.0}
    failed = {name: [n for n, ok, _ in ssl_sanity.verdict(curve, healthy, end, log_k) if not ok]
              for name, end in (("sharp", sharp), ("uniform", uniform), ("flat", flat))}
    assert failed == {"sharp": ["teacher entropy away from 0", "many prototypes used"],
                      "uniform": ["teacher entropy away from log K"], "flat": ["CLS features not collapsed"]}
    rising = [{**r, "loss": r["loss"] + 0.5 * i} for i, r in enumerate(curve)]
    assert not ssl_sanity.verdict(rising, healthy, healthy, log_k)[0][1]


def test_ssl_sanity_runs_end_to_end(capsys, tmp_path):
    code = ssl_sanity.main(["--steps", "12", "--batch", "8", "--train-images", "64", "--knn-train", "60",
                            "--knn-test", "30", "--window", "4", "--workers", "0", "--out", str(tmp_path),
                            *[a for s in TINY_SETS for a in ("--set", s)]])
    text = capsys.readouterr().out
    summary = json.loads((tmp_path / "ssl_sanity.json").read_text())
    assert code == (0 if summary["ok"] else 1)
    assert summary["steps"] == 12 and [r["steps"] for r in summary["curve"]] == ["1-4", "5-8", "9-12"]
    assert [m["step"] for m in summary["monitors"]] == [1, 4, 8, 12]  # after the first step, then every --window
    assert summary["log_k"] == pytest.approx(math.log(64))
    for m in summary["monitors"]:
        assert 0.0 <= m["teacher_entropy"] <= math.log(64) + 1e-4
    for which in ("knn_random_init", "knn_teacher", "knn_pixels"):
        assert set(summary[which]) == {"10", "20"} and all(0 <= v <= 100 for v in summary[which].values())
    assert summary["gain"] == pytest.approx(summary["knn_teacher"]["20"] - summary["knn_random_init"]["20"])
    assert (tmp_path / "run" / "export" / "teacher.pth").is_file()
    for section in ("loss", "collapse monitors", "verdict:", "k-NN top-1 on 30", "k-NN gain at k=20"):
        assert section in text


def test_distill_fmnist_runs_end_to_end_and_reuses_finished_runs(tmp_path):
    bench = _load("distill_fmnist")
    argv = ["--workdir", str(tmp_path), "--steps", "12", "--teacher-steps", "12", "--batch", "8", "--size", "28",
            "--n-train", "64", "--n-bank", "50", "--n-test", "30", "--student", "embed_dim = 16",
            "--scratch-grid", "0.004:0.99", "0.004:0.99:0", "--distill-set", "loss.koleo_weight=0"]
    code = bench.main(argv)
    res = json.loads((tmp_path / "results.json").read_text())
    top1 = {name: acc["20"] for name, acc in res["knn_top1"].items()}
    assert set(top1) == {"student untrained (reference)", "teacher vit_mini (trainer, EMA)",
                         "student distilled (EMA, the deliverable)", "student distilled (raw)",
                         "student scratch lr 0.004 m 0.99 (EMA teacher)", "student scratch lr 0.004 m 0.99 (student)",
                         "student scratch lr 0.004 m 0.99 ibot 0 (EMA teacher)",
                         "student scratch lr 0.004 m 0.99 ibot 0 (student)"}
    assert all(0 <= v <= 100 for v in top1.values())
    teacher, distilled = top1["teacher vit_mini (trainer, EMA)"], top1["student distilled (EMA, the deliverable)"]
    scratch = max(v for k, v in top1.items() if "scratch" in k)
    assert res["checks"] == {"within_3_points_of_teacher": teacher - distilled <= 3.0,
                             "above_scratch": distilled > scratch}
    assert code == (0 if all(res["checks"].values()) else 1)
    assert all(s > 0 for s in res["wall_s"].values())
    # the overrides reached their runs
    assert "koleo_weight = 0.0" in (tmp_path / "distill" / "config.toml").read_text()
    assert "ibot_weight = 0.0" in (tmp_path / "scratch-lr0.004-m0.99-ibot0" / "config.toml").read_text()
    assert "ibot_weight = 1.0" in (tmp_path / "scratch-lr0.004-m0.99" / "config.toml").read_text()
    assert bench.main(argv) == code  # a second call reuses every finished run
    assert all(s == 0 for s in json.loads((tmp_path / "results.json").read_text())["wall_s"].values())
    with pytest.raises(SystemExit, match="another recipe or other settings"):  # never a stale run for new settings
        bench.main(argv + ["--distill-set", "loss.koleo_weight=0.05"])


def test_ssl_zoo_smoke_two_methods_one_seed(capsys, tmp_path):
    """bench/ssl_zoo.py end to end on tiny settings: curation (no Ray) of 300 images, SimCLR v1 and tiny DINOv2 for
    6 steps of 8 images, k-NN and linear probe on 300 / 100 images; then a rerun reuses every run and evaluation."""
    zoo = _load("ssl_zoo")
    out = tmp_path / "zoo.json"
    argv = ["--workdir", str(tmp_path), "--methods", "dinov2", "simclrv1", "--seeds", "0", "--images", "48",
            "--batch", "8", "--pool", "300", "--eval-train", "300", "--eval-test", "100", "--ray", "none",
            "--probe-epochs", "2", "--json", str(out)]
    assert zoo.main(argv) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert [r["method"] for r in res["rows"]][:2] == ["simclrv1", "dinov2"]  # lineage order, not argv order
    assert {"random init (resnet18_small width=16 @28)",
            "random init (vit_mini patch_size=7, img_size=56, init_values=0 @56)", "raw pixels"} <= set(rows)
    for name, row in rows.items():
        for metric in ("knn20", "linear"):
            s = row[metric]
            assert 0.0 <= s["min"] <= s["median"] <= s["max"] <= 1.0, (name, metric, s)
    for name in ("simclrv1", "dinov2"):
        r = rows[name]
        assert r["n"] == 1 and r["images"] == 48 and r["steps"] == 6 and r["cpu_min"]["median"] > 0
        assert f"| {name} |" in text
    assert res["curation"]["funnel"]["ingest"]["in"] == 300 and res["curation"]["count"] == 150
    assert "| raw pixels |" in text and "k-NN@20 median [min-max]" in text
    assert zoo.main(argv) == 0  # resumable: everything is reused
    rerun = json.loads(out.read_text())
    assert all(r["reused"] for row in rerun["rows"] for r in row.get("runs", []) if "reused" in r)
    with pytest.raises(SystemExit, match="other settings"):  # a finished run is never reused for new settings
        zoo.main([*argv[:10], "16", *argv[11:]])  # --batch 16
    with pytest.raises(SystemExit):
        zoo.main(["--workdir", str(tmp_path), "--methods", "simclr"])
    assert "valid: instdisc, invaspread, cpc" in capsys.readouterr().err
