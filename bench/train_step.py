"""Images/s and peak memory of one full DINOv2 training step through the real ``Trainer.train_step``.

One step = teacher forward on the 2 global crops, packed student forward of the masked globals + N locals,
DINO + iBOT + KoLeo, backward, per-module gradient clipping, AdamW step and the EMA teacher update, exactly as
``python -m pretrain train`` runs it. The batch is synthetic but shaped like the collate output: ``global_crops``
(2B, 3, G, G), ``local_crops`` (nB, 3, L, L) and DINOv2 block masks from ``pretrain.data.masking``.

    python bench/train_step.py                                   # vits14, bf16 and fp32 autocast, CPU, batch 8
    python bench/train_step.py --models vits14 --precisions bf16 --batch 16 --steps 5
    python bench/train_step.py --models vitl14 vitg14 --device cuda --batch 32   # on a GPU: adds MFU

The recipe ``pretrain/recipes/<model>.toml`` gives heads, loss and optimizer (``--recipe`` picks another; any
``--set`` override applies on top). Each configuration runs in a fresh spawned process (single process, no
process group), so its peak memory is its own: peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
Throughput is ``batch / step time`` (source images per step, each with 2 global + N local crops), the median
over ``--steps`` timed steps after ``--warmup`` steps, with the min-max range; MFU is the trainer's figure
(matmul FLOPs of student forward + backward and teacher forward over the vendor bf16 peak), GPU only.

On CPUs without native bf16 (no AVX512-BF16 / AMX, e.g. AVX2-only), bf16 autocast is emulated and several times
slower than fp32; on a shared machine ``--threads 1`` avoids OpenMP threads spinning on descheduled peers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = Path(__file__).resolve().parents[1] / "pretrain" / "recipes"
_RESULT = "BENCH_RESULT "


def synthetic_batch(batch: int, n_local: int, global_size: int, local_size: int, patch_size: int,
                    masking: Any, seed: int) -> dict[str, Any]:
    """A multi-crop batch shaped like ``collate_multicrop``'s output (crop-major, DINOv2 block masks)."""
    import numpy as np
    import torch

    from pretrain.data.masking import sample_mask_batch

    gen = torch.Generator().manual_seed(seed)
    grid = (global_size // patch_size, global_size // patch_size)
    mb = sample_mask_batch(2 * batch, grid, generator=np.random.default_rng(seed), cfg=masking)
    return {
        "global_crops": torch.randn(2 * batch, 3, global_size, global_size, generator=gen),
        "local_crops": torch.randn(n_local * batch, 3, local_size, local_size, generator=gen),
        "masks": mb.masks, "mask_indices": mb.mask_indices, "masks_weight": mb.masks_weight,
        "n_masked_patches": mb.n_masked_patches, "upperbound": mb.upperbound,
    }


def _overrides(spec: dict[str, Any]) -> list[str]:
    sets = {
        "data.shards.urls": '["unused-{000000..000000}.tar"]',  # the bench feeds batches itself
        "data.shards.batch_size": str(spec["batch"]), "data.shards.num_workers": "0",
        "train.precision": f'"{spec["precision"]}"',
        "train.tensorboard": "false", "train.monitor_every": "1000000000", "phases": "[]",
    }
    if spec["n_local"] is not None:
        sets["data.crops.n_local"] = str(spec["n_local"])
    if spec["global_size"]:
        sets["data.crops.global_size"] = str(spec["global_size"])
    if spec["local_size"]:
        sets["data.crops.local_size"] = str(spec["local_size"])
    return [f"{k}={v}" for k, v in sets.items()] + list(spec["overrides"])


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build a Trainer from the recipe, run warm-up + timed steps on synthetic batches; one row of figures."""
    if spec["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer picks CUDA whenever it sees one
    import torch

    from pretrain.train import TrainConfig, Trainer
    from pretrain.utils.config import load_config

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = load_config(TrainConfig, spec["recipe"], _overrides(spec))
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as out:
        trainer = Trainer(cfg, out)
        if trainer.device.type != spec["device"]:
            raise RuntimeError(f"trainer runs on {trainer.device}, expected {spec['device']}")
        phase = trainer.phases[0]
        crops = phase.crops
        patch = trainer.arch.student["backbone"].patch_size
        # steady state: after warm-up and the frozen-prototype iterations, so every parameter gets its update
        first = min(phase.end - spec["warmup"] - spec["steps"] - 1,
                    phase.start + cfg.schedule.warmup_iters + cfg.schedule.freeze_last_layer_iters)
        batches = [synthetic_batch(spec["batch"], crops.n_local, crops.global_size, crops.local_size, patch,
                                   cfg.data.masking, seed=i) for i in range(2)]
        times, rows = [], []
        for i in range(spec["warmup"] + spec["steps"]):
            t0 = time.perf_counter()
            metrics = trainer.train_step(batches[i % 2], first + i, phase)
            wall = time.perf_counter() - t0
            if metrics is None:
                raise RuntimeError(f"step {first + i} was skipped as non-finite")
            if i >= spec["warmup"]:
                times.append(wall)
                rows.append(metrics)
        trainer.metrics.close()
    n_params = sum(p.numel() for p in trainer.arch.student.parameters())
    med = statistics.median(times)
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    return {
        **spec, "params_m": n_params / 1e6, "s_per_step": med, "img_per_s": spec["batch"] / med,
        "min_img_per_s": spec["batch"] / max(times), "max_img_per_s": spec["batch"] / min(times),
        "peak_mb": max(r["peak_mem_mb"] for r in rows), "mfu": statistics.median(mfus) if mfus else None,
        "loss": rows[-1]["loss"], "global_size": crops.global_size, "local_size": crops.local_size,
        "n_local": crops.n_local, "threads": torch.get_num_threads(), "step_times": times,
    }


def run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """``measure(spec)`` in a fresh Python process (its own peak RSS / CUDA allocator); raises on its failure."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise RuntimeError(tail[0])
    return json.loads(lines[-1][len(_RESULT):])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help="recipes to bench (default: vits14 on CPU, vitl14 vitg14 on CUDA)")
    p.add_argument("--recipe", default=None, help="TOML recipe for every model (default: recipes/<model>.toml)")
    p.add_argument("--batch", type=int, default=None, help="source images per step (default: 8 CPU, 32 CUDA)")
    p.add_argument("--precisions", nargs="+", default=None, choices=["bf16", "fp32"],
                   help="autocast precision(s) (default: bf16 fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--n-local", type=int, default=None, help="local crops per image (default: the recipe's)")
    p.add_argument("--global-size", type=int, default=None, help="global crop side (default: the recipe's)")
    p.add_argument("--local-size", type=int, default=None, help="local crop side (default: the recipe's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override, e.g. --set train.activation_checkpointing=true (repeatable)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    models = args.models or (["vitl14", "vitg14"] if device == "cuda" else ["vits14"])
    precisions = args.precisions or (["bf16"] if device == "cuda" else ["bf16", "fp32"])
    batch = args.batch or (32 if device == "cuda" else 8)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} threads={args.threads or torch.get_num_threads()} "
          f"batch={batch} steps={args.steps} (median, after {args.warmup} warm-up)")
    header = (f"{'model':8} {'prec':5} {'params':>7} {'crops':>14} {'s/step':>8} {'img/s':>8} {'range':>13} "
              f"{'peak MB':>9} {'MFU':>6}")
    print(header)
    print("-" * len(header))
    rows = []
    for model in models:
        recipe = args.recipe or str(RECIPES / f"{model}.toml")
        if not Path(recipe).is_file():
            raise SystemExit(f"no recipe {recipe}: pass --recipe or a model with a recipe in {RECIPES}")
        for precision in precisions:
            spec = {"model": model, "recipe": recipe, "precision": precision, "batch": batch,
                    "n_local": args.n_local, "global_size": args.global_size, "local_size": args.local_size,
                    "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "device": device,
                    "overrides": args.overrides}
            try:
                r = run_isolated(spec)
            except Exception as exc:  # report and go on: one failing configuration must not hide the others
                print(f"{model:8} {precision:5} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            rows.append(r)
            crops = f"2x{r['global_size']}+{r['n_local']}x{r['local_size']}"
            rng = f"{r['min_img_per_s']:.2f}-{r['max_img_per_s']:.2f}"
            mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
            print(f"{model:8} {precision:5} {r['params_m']:6.1f}M {crops:>14} {r['s_per_step']:8.2f} "
                  f"{r['img_per_s']:8.2f} {rng:>13} {r['peak_mb']:9.0f} {mfu:>6}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(_RESULT + json.dumps(measure(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
