"""``python -m pretrain eval {knn,linear,features}``: evaluate a frozen backbone.

Configs come from an optional ``--config eval.toml`` (sections ``backbone``, ``data``, ``extract``, ``knn``,
``linear``), then the flags, then ``--set section.field=value`` overrides, built with ``pretrain.utils.config``.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pretrain.utils.config import apply_overrides, build, load_toml, parse_value, to_dict

from .config import EvalRunConfig, FeatureExportConfig
from .features import FeatureSet, load_features, save_features
from .knn import knn_evaluate
from .linear import run_linear_probe
from .report import knn_table, linear_table, write_json, write_toml
from .run import extract_split, knn_eval_model, linear_eval_model, load_backbone

logger = logging.getLogger(__name__)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    if value is None:
        return
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _config_dict(args: argparse.Namespace, flag_fields: dict[str, str]) -> dict[str, Any]:
    data = load_toml(args.config) if args.config else {}
    for attr, dotted in flag_fields.items():
        _set(data, dotted, getattr(args, attr, None))
    if getattr(args, "backbone_arg", None):
        for item in args.backbone_arg:
            if "=" not in item:
                raise ValueError(f"--backbone-arg {item!r} must look like field=value (e.g. patch_size=7)")
            k, v = item.split("=", 1)
            _set(data, f"backbone.overrides.{k.strip()}", parse_value(v.strip()))
    return apply_overrides(data, args.set or [])


_COMMON = {"backbone": "backbone.name", "weights": "backbone.weights", "train": "data.train", "test": "data.test",
           "format": "data.format", "train_split": "data.train_split", "test_split": "data.test_split",
           "image_size": "data.image_size", "limit": "data.limit", "batch_size": "extract.batch_size",
           "num_workers": "extract.num_workers", "device": "extract.device", "precision": "extract.precision"}


def cmd_knn(args: argparse.Namespace) -> int:
    """Weighted k-NN (cosine, T=0.07, k in 10/20/100/200) on last-block CLS features -> OUTPUT/knn.json.

    Example: python -m pretrain eval knn --backbone vits14 --weights dinov2_vits14_pretrain.pth
             --train 'shards/train-{000000..000099}.tar' --test 'shards/val-{000000..000009}.tar' --output out/
    """
    fields = {**_COMMON, "features": "features", "ks": "knn.ks", "temperature": "knn.temperature",
              "output": "output_dir"}
    run = build(EvalRunConfig, _config_dict(args, fields))
    if run.features is not None:
        train, test = load_features(run.features, "train"), load_features(run.features, "test")
        result = knn_evaluate(train, test, run.knn, device=run.extract.device)
    else:
        result = knn_eval_model(load_backbone(run.backbone), run.data, run.extract, run.knn)
    write_toml(to_dict(run), run.output_dir, "knn.config.toml")
    path = write_json({"eval": "knn", "config": to_dict(run), **result.to_dict()}, run.output_dir, "knn.json")
    print(knn_table(result))
    print(f"results: {path}")
    return 0


def cmd_linear(args: argparse.Namespace) -> int:
    """Linear probe on frozen features; (feature set, lr) chosen on a hold-out of TRAIN -> OUTPUT/linear.json.

    Heads for {last-1, last-n CLS} x {with, without avg-pooled patch tokens} x learning rates train in parallel.
    The reported (test) split is loaded only after the selection is final, and evaluated once.
    Example: python -m pretrain eval linear --backbone vits14 --weights w.pth --train train/ --test val/ --output out/
    """
    fields = {**_COMMON, "features": "features", "output": "output_dir", "epochs": "linear.epochs",
              "lrs": "linear.learning_rates", "n_last_blocks": "linear.n_last_blocks",
              "holdout_fraction": "linear.holdout_fraction", "seed": "linear.seed",
              "linear_batch_size": "linear.batch_size", "refit": "linear.refit"}
    run = build(EvalRunConfig, _config_dict(args, fields))
    if run.features is not None:
        features = run.features
        result = run_linear_probe(load_features(features, "train"), lambda: load_features(features, "test"),
                                  run.linear)
    else:
        result = linear_eval_model(load_backbone(run.backbone), run.data, run.extract, run.linear)
    write_toml(to_dict(run), run.output_dir, "linear.config.toml")
    path = write_json({"eval": "linear", "config": to_dict(run), **result.to_dict()}, run.output_dir, "linear.json")
    print(linear_table(result))
    print(f"results: {path}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    """Export backbone features of --train and/or --test to one Parquet file (key, label, split, feature).

    The file feeds 'eval knn --features FILE' and 'eval linear --features FILE'. Mode lastn_avgpool (default)
    holds the CLS tokens of the last n blocks and the mean patch token, which serves both evaluations.
    """
    fields = {**_COMMON, "mode": "mode", "n_last_blocks": "n_last_blocks", "output": "output"}
    cfg = build(FeatureExportConfig, _config_dict(args, fields))
    model = load_backbone(cfg.backbone)
    splits: dict[str, FeatureSet] = {}
    classes = None
    for which in ("train", "test"):
        if getattr(cfg.data, which) is not None:
            splits[which] = extract_split(model, cfg.data, cfg.extract, which, mode=cfg.mode,
                                          n_last_blocks=cfg.n_last_blocks, classes=classes)
            classes = splits[which].classes
    save_features(splits, cfg.output, extra={"backbone": to_dict(cfg.backbone), "image_size": cfg.data.image_size})
    for name, fs in splits.items():
        print(f"{name}: {len(fs)} samples x {fs.features.shape[1]} features ({fs.mode})")
    print(f"features: {cfg.output}")
    return 0


def _add_common(p: argparse.ArgumentParser, *, features_input: bool) -> None:
    p.add_argument("--config", help="TOML file with sections backbone/data/extract/knn/linear")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="dotted config override")
    p.add_argument("--backbone", help="architecture name (vits14, vitg14_reg4, vit_test, ...)")
    p.add_argument("--weights", help="official DINOv2 .pth or dinoforge export (path or fsspec URL)")
    p.add_argument("--backbone-arg", action="append", metavar="FIELD=VALUE", help="build_backbone override")
    p.add_argument("--train", help="train split: shards (.tar, brace pattern), image folder or Parquet labels")
    p.add_argument("--test", help="reported split (same kinds of input)")
    p.add_argument("--format", choices=["auto", "wds", "folder", "parquet"])
    p.add_argument("--train-split", help="Parquet 'split' value of the train rows")
    p.add_argument("--test-split", help="Parquet 'split' value of the test rows")
    p.add_argument("--image-size", type=int, help="centre-crop size (multiple of the patch size; default 224)")
    p.add_argument("--limit", type=int, help="use only the first N samples of each split")
    p.add_argument("--batch-size", type=int, help="images per forward pass")
    p.add_argument("--num-workers", type=int, help="DataLoader workers")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    if features_input:
        p.add_argument("--features", help="feature Parquet from 'eval features' (instead of backbone + data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("knn", cmd_knn), ("linear", cmd_linear), ("features", cmd_features)):
        doc = fn.__doc__ or ""
        p = sub.add_parser(name, help=doc.splitlines()[0], description=inspect.cleandoc(doc),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=fn)
        _add_common(p, features_input=name != "features")
        p.add_argument("--output", help="output directory (knn/linear) or .parquet file (features)")
        if name == "knn":
            p.add_argument("--ks", type=int, nargs="+", help="neighbour counts (default 10 20 100 200)")
            p.add_argument("--temperature", type=float, help="vote temperature (default 0.07)")
        if name == "linear":
            p.add_argument("--epochs", type=int, help="passes over the train features (default 10)")
            p.add_argument("--lrs", type=float, nargs="+", help="base learning-rate grid (default 1e-5 ... 0.1)")
            p.add_argument("--n-last-blocks", type=int, help="blocks of the multi-block CLS sets (default 4)")
            p.add_argument("--holdout-fraction", type=float, help="share of TRAIN held out for selection (0.1)")
            p.add_argument("--seed", type=int, help="seed of the hold-out split and training")
            p.add_argument("--linear-batch-size", type=int, help="feature vectors per SGD step (default 256)")
            p.add_argument("--no-refit", dest="refit", action="store_const", const=False,
                           help="keep the head trained on the fit part instead of retraining on all of train")
        if name == "features":
            p.add_argument("--mode", choices=["cls", "lastn", "lastn_avgpool", "avgpool"])
            p.add_argument("--n-last-blocks", type=int, help="blocks of the lastn modes (default 4)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pretrain eval``; returns the exit status (2 on a config error or missing input)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
