"""Distillation on Fashion-MNIST, on CPU: does a distilled small student match its teacher and beat training from
scratch?

1. Writes Fashion-MNIST shards (28 px PNG + ``cls``): a training set, a k-NN bank (train split) and a test set.
2. Pretrains a tiny teacher with the trainer: ``python -m pretrain train pretrain/recipes/tiny_cpu.toml``
   (vit_mini, patch 7, ``--size`` px global / half that local crops, ``--teacher-steps`` iterations; LayerScale
   off as in the tiny recipes unless ``--init-values`` is given, for every model).
3. Distils it into a smaller student: ``python -m pretrain distill pretrain/recipes/distill_tiny_cpu.toml`` (one
   vit_test student, by default dim 64 and 4 blocks (2.2x fewer parameters than the teacher); ``--student``
   sets its fields, ``--distill-set`` other recipe fields); same data and batch, ``--steps`` iterations).
4. Trains the same student from scratch with the trainer (tiny_cpu.toml) for the same number of steps, once per
   ``--scratch-grid`` setting (base lr, EMA momentum, optionally iBOT weight); the best scratch model of all (EMA
   or raw) is the bar to beat.
5. k-NN (``pretrain.eval.knn_eval_model``: cosine, T=0.07, weighted votes) of the teacher export, the distilled
   student (its EMA, the deliverable) and every scratch run's EMA teacher and student, on the Fashion-MNIST test
   images; prints a table and the two checks of issue 7 (student within 3 points of the teacher, above scratch).

Every command runs with ``OMP_NUM_THREADS=1``: on a small shared CPU box, two OpenMP threads fighting for cores
made each step 5-10x slower. Usage::

    .venv/bin/python bench/distill_fmnist.py --workdir /tmp/distill_fmnist --teacher-steps 900 --steps 300

Finished runs in the work directory are reused when the recipe text and every override are the same (a run is
finished once its ``export/`` exists); a finished run of other settings stops the bench with a clear error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain.eval.config import DataConfig, ExtractConfig, KnnConfig
from pretrain.eval.fashion_mnist import load_fashion_mnist, write_shards
from pretrain.eval.run import knn_eval_model
from pretrain.models import build_backbone
from pretrain.utils.config import parse_value

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "pretrain" / "recipes" / "tiny_cpu.toml")
DISTILL = str(ROOT / "pretrain" / "recipes" / "distill_tiny_cpu.toml")
SCRATCH_GRID = ["0.004:0.99", "0.008:0.99", "0.004:0.95", "0.008:0.95", "0.004:0.95:0", "0.008:0.95:0"]


def _data(work: Path, n_train: int, n_bank: int, n_test: int) -> tuple[str, str, str]:
    """Training shards (written once per work directory) and k-NN bank/test shards named by their size, so a
    larger evaluation can reuse runs that are already trained."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "done").exists():
        x, y = load_fashion_mnist("train")
        write_shards(x[:n_train], y[:n_train], str(data / "train-%06d.tar"), maxcount=2000)
        (data / "done").write_text(str(n_train))
    elif int((data / "done").read_text()) != n_train:
        raise SystemExit(f"{data} holds training shards of another --n-train; use another --workdir")
    bank, test = data / f"bank{n_bank}-000000.tar", data / f"test{n_test}-000000.tar"
    if not bank.exists():
        xb, yb = load_fashion_mnist("train", n_bank)  # class-balanced bank for k-NN
        write_shards(xb, yb, str(data / f"bank{n_bank}-%06d.tar"), maxcount=n_bank)
    if not test.exists():
        xt, yt = load_fashion_mnist("test", n_test)
        write_shards(xt, yt, str(data / f"test{n_test}-%06d.tar"), maxcount=n_test)
    last = (n_train + 1999) // 2000 - 1
    return str(data / f"train-{{000000..{last:06d}}}.tar"), str(bank), str(test)


def _common(urls: str, steps: int, batch: int, size: int) -> list[str]:
    return [f'data.shards.urls=["{urls}"]', f"data.shards.batch_size={batch}", "data.shards.num_workers=1",
            "data.shards.shuffle_buffer=1000", f"data.crops.global_size={size}",
            f"data.crops.local_size={size // 2}",
            f"schedule.epoch_length={steps // 6}", "schedule.epochs=6", 'train.precision="fp32"',
            "train.tensorboard=false", f"train.checkpoint_every={steps}"]


def _run(cmd: str, recipe: str, out: Path, sets: list[str]) -> float:
    request = json.dumps({"cmd": cmd, "recipe": Path(recipe).read_text(), "sets": sets}, indent=1)
    if (out / "export").is_dir():  # finished earlier (the export is written last)
        done = out / "bench_request.json"
        if not done.exists() or done.read_text() != request:
            raise SystemExit(f"{out} holds a finished run of another recipe or other settings; delete it or use "
                             "another --workdir")
        print(f"# {out}: finished run of the same request, skipped", flush=True)
        return 0.0
    argv = [sys.executable, "-m", "pretrain", cmd, recipe, "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    print("$", " ".join(argv[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    (out / "bench_request.json").write_text(request)
    return time.perf_counter() - t0


def _knn(weights: Path | torch.nn.Module, bank: str, test: str, size: int) -> dict[int, float]:
    model = weights if isinstance(weights, torch.nn.Module) else build_backbone(None, weights=str(weights))
    model.eval()
    data = DataConfig(train=bank, test=test, image_size=size, resize_size=size)
    result = knn_eval_model(model, data, ExtractConfig(batch_size=256, num_workers=0, device="cpu"),
                            KnnConfig(ks=[10, 20]))
    return {k: 100 * t for k, t in zip(result.ks, result.top1)}


def _grid_entry(text: str, parser: argparse.ArgumentParser) -> tuple[float, float, float | None]:
    try:
        values = [float(v) for v in text.split(":")]
    except ValueError:
        values = []
    if len(values) not in (2, 3):
        parser.error(f"--scratch-grid entries are LR:MOMENTUM or LR:MOMENTUM:IBOT_WEIGHT, got {text!r}")
    return values[0], values[1], values[2] if len(values) == 3 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/distill_fmnist", help="shards, runs and results.json go here")
    p.add_argument("--steps", type=int, default=300, help="iterations of the distillation and the scratch run")
    p.add_argument("--teacher-steps", type=int, default=None, help="iterations of the teacher run (default --steps)")
    p.add_argument("--size", type=int, default=56, help="global crop and k-NN image size (local crops: half)")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--n-train", type=int, default=10000, help="training images (Fashion-MNIST train split)")
    p.add_argument("--n-bank", type=int, default=10000, help="k-NN bank images (train split, class-balanced)")
    p.add_argument("--n-test", type=int, default=10000, help="test images (test split, class-balanced)")
    p.add_argument("--init-values", type=float, default=0.0,
                   help="LayerScale init of every model (default 0 = off, as the tiny recipes; with DINOv2's 1e-5 an "
                        "untrained 2-block ViT's CLS token is the same for every image)")
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override of the teacher run only (repeatable)")
    p.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override of the distillation run only (repeatable)")
    p.add_argument("--student", default="embed_dim = 64, depth = 4",
                   help="vit_test overrides of the student (distilled and scratch), TOML inline-table fields")
    p.add_argument("--scratch-grid", nargs="+", default=SCRATCH_GRID, metavar="LR:MOMENTUM[:IBOT]",
                   help="base lr, EMA momentum and optionally the iBOT loss weight (default: tiny_cpu.toml's) of each "
                        "scratch run; the best model of all counts")
    args = p.parse_args(argv)
    args.teacher_steps = args.teacher_steps or args.steps
    if args.steps % 6 or args.teacher_steps % 6:
        p.error("--steps and --teacher-steps must be multiples of 6 (the tiny recipes have 6 epochs)")
    grid = [_grid_entry(g, p) for g in args.scratch_grid]
    torch.set_num_threads(1)
    work = Path(args.workdir)
    urls, bank, test = _data(work, args.n_train, args.n_bank, args.n_test)
    common = _common(urls, args.steps, args.batch, args.size)
    vit = f"patch_size = 7, img_size = {args.size}, init_values = {args.init_values}"
    student = f"{{{vit}, {args.student}}}" if args.student else f"{{{vit}}}"
    times = {}
    times["teacher"] = _run("train", TINY, work / "teacher", common + [
        f"backbone.overrides={{{vit}}}", "phases=[]", f"schedule.epoch_length={args.teacher_steps // 6}",
        f"train.checkpoint_every={args.teacher_steps}", *args.teacher_set])
    times["distill"] = _run("distill", DISTILL, work / "distill", common + [
        f'teacher.weights="{work / "teacher" / "export" / "teacher.pth"}"',
        f'students=[{{name = "student", arch = "vit_test", overrides = {student}}}]', *args.distill_set])
    scratch_rows = {}
    for lr, m, ibot in grid:
        tag, name, extra = f"lr {lr:g} m {m:g}", f"scratch-lr{lr:g}-m{m:g}", []
        if ibot is not None:  # otherwise tiny_cpu.toml's iBOT weight
            tag, name, extra = f"{tag} ibot {ibot:g}", f"{name}-ibot{ibot:g}", [f"loss.ibot_weight={ibot}"]
        times[name] = _run("train", TINY, work / name, common + [
            'backbone.name="vit_test"', f"backbone.overrides={student}", "phases=[]", f"schedule.base_lr={lr}",
            f"schedule.momentum_teacher={m}", *extra])
        scratch_rows[f"student scratch {tag} (EMA teacher)"] = work / name / "export" / "teacher.pth"
        scratch_rows[f"student scratch {tag} (student)"] = work / name / "export" / "student.pth"
    torch.manual_seed(0)
    untrained = build_backbone("vit_test", **parse_value(student))
    rows: dict[str, Path | torch.nn.Module] = {
        "student untrained (reference)": untrained,
        "teacher vit_mini (trainer, EMA)": work / "teacher" / "export" / "teacher.pth",
        "student distilled (EMA, the deliverable)": work / "distill" / "export" / "student.pth",
        "student distilled (raw)": work / "distill" / "export" / "student_raw.pth",
        **scratch_rows,
    }
    results = {name: _knn(path, bank, test, args.size) for name, path in rows.items()}
    print(f"\nFashion-MNIST k-NN top-1 (%), bank {args.n_bank} train images, {args.n_test} test images, "
          f"{args.size} px, teacher {args.teacher_steps} steps, distillation and scratch {args.steps} steps, "
          f"batch {args.batch}, student vit_test {student}")
    print(f"{'model':56} {'k=10':>7} {'k=20':>7}")
    for name, acc in results.items():
        print(f"{name:56} {acc[10]:7.2f} {acc[20]:7.2f}")
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    teacher = results["teacher vit_mini (trainer, EMA)"][20]
    distilled = results["student distilled (EMA, the deliverable)"][20]
    scratch = max(results[name][20] for name in scratch_rows)
    checks = {"within_3_points_of_teacher": teacher - distilled <= 3.0, "above_scratch": distilled > scratch}
    print(f"k=20: teacher {teacher:.2f}, distilled {distilled:.2f} (gap {teacher - distilled:+.2f}), best of "
          f"{len(scratch_rows)} scratch models {scratch:.2f} -> " + ", ".join(f"{k}: {v}" for k, v in checks.items()))
    (work / "results.json").write_text(json.dumps({"knn_top1": results, "wall_s": times, "checks": checks,
                                                   "args": vars(args)}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
