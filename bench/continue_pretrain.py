"""Continued pretraining from a backbone-only checkpoint: naive vs head warm-up, k-NN before and after (issue 17).

    .venv/bin/python bench/continue_pretrain.py                      # 600 base steps, 300 continue steps each
    .venv/bin/python bench/continue_pretrain.py --base-steps 200 --steps 100 --knn-test 1000   # a quick look

1. Pretrain the tiny ViT (``tiny_cpu.toml``) on Fashion-MNIST train images 0..N/2 and export it; the export
   (``teacher.pth``: backbone only, as DINOv2/DINOv3 release them) is the "released" backbone.
2. Continue from it on *new* data (train images N/2..N) for the same number of steps, two ways:
   (a) naive: fresh heads, everything trained from step 0 (``head_warmup.max_iters = 0``);
   (b) ``continue_tiny_cpu.toml``: the head warm-up, then the backbone at its own lr with its own warm-up.
3. k-NN (cosine, k = 10 / 20, T = 0.07) on Fashion-MNIST test images with a class-balanced train bank: the
   released backbone, then (a) and (b).

Prints a table and a JSON line; the warm-up path should stay within 1 point of the released backbone or improve
it. Runs are kept in ``--workdir`` and reused when their settings match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from distill_fmnist import _common, _knn, _run  # noqa: E402  (the same runner and k-NN as the distillation bench)

from pretrain.eval.fashion_mnist import load_fashion_mnist, write_shards  # noqa: E402

TINY = str(ROOT / "pretrain" / "recipes" / "tiny_cpu.toml")
CONTINUE = str(ROOT / "pretrain" / "recipes" / "continue_tiny_cpu.toml")


def _split_data(work: Path, n_train: int, n_bank: int, n_test: int) -> tuple[str, str, str, str]:
    """Shards of the first and second half of the training images, and the k-NN bank / test shards."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    x, y = load_fashion_mnist("train")
    half = n_train // 2
    urls = []
    for name, lo, hi in (("old", 0, half), ("new", half, n_train)):
        if not (data / f"{name}-done").exists():
            write_shards(x[lo:hi], y[lo:hi], str(data / f"{name}-%06d.tar"), maxcount=2000)
            (data / f"{name}-done").write_text(str(hi - lo))
        urls.append(str(data / f"{name}-{{000000..{(hi - lo + 1999) // 2000 - 1:06d}}}.tar"))
    bank, test = data / f"bank{n_bank}-000000.tar", data / f"test{n_test}-000000.tar"
    if not bank.exists():
        xb, yb = load_fashion_mnist("train", n_bank)
        write_shards(xb, yb, str(data / f"bank{n_bank}-%06d.tar"), maxcount=n_bank)
    if not test.exists():
        xt, yt = load_fashion_mnist("test", n_test)
        write_shards(xt, yt, str(data / f"test{n_test}-%06d.tar"), maxcount=n_test)
    return urls[0], urls[1], str(bank), str(test)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="bench_out/continue_pretrain")
    ap.add_argument("--n-train", type=int, default=20000, help="training images (half old, half new)")
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300, help="continue steps of each variant")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--knn-bank", type=int, default=10000)
    ap.add_argument("--knn-test", type=int, default=10000)
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    old, new, bank, test = _split_data(work, args.n_train, args.knn_bank, args.knn_test)
    t0 = time.perf_counter()
    base = work / "base"
    _run("train", TINY, base, _common(old, args.base_steps, args.batch, args.size) + ["phases=[]"])
    released = base / "export" / "teacher.pth"
    rows = {"released backbone": _knn(released, bank, test, args.size)}
    sets = _common(new, args.steps, args.batch, args.size) + ["phases=[]", f'backbone.weights="{released}"',
                                                               "train.log_every=1"]
    warm = max(4, args.steps // 6)
    variants = {
        "naive (fresh heads, all trained)": (TINY, sets),
        "head warm-up": (CONTINUE, sets + [f"head_warmup.max_iters={2 * warm}", f"head_warmup.min_iters={warm // 2}",
                                           f"head_warmup.backbone_warmup_iters={warm}"]),
    }  # fmt: skip
    for name, (recipe, s) in variants.items():
        out = work / name.split()[0].replace("-", "_")
        _run("train", recipe, out, s)
        rows[name] = _knn(out / "export" / "teacher.pth", bank, test, args.size)
        if recipe == CONTINUE:
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            frozen = sum(1 for m in metrics if m.get("backbone_frozen") == 1.0)
            rows[name]["head_only_steps"] = frozen
    start = rows["released backbone"][20]
    print(f"\n{'model':<34} {'k-NN@10':>8} {'k-NN@20':>8} {'vs released':>12}")
    for name, r in rows.items():
        print(f"{name:<34} {r[10]:8.2f} {r[20]:8.2f} {r[20] - start:+12.2f}")
    result = {"bench": "continue_pretrain", "base_steps": args.base_steps, "steps": args.steps,
              "seconds": round(time.perf_counter() - t0, 1),
              **{k: {str(kk): round(v, 2) for kk, v in r.items()} for k, r in rows.items()},
              "warmup_within_1_point": rows["head warm-up"][20] >= start - 1.0}  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
