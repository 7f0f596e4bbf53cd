"""``python -m pretrain <command> ...``: train, distill, eval, export, demo.

Each command is a module with ``main(argv) -> int``; ``--help`` after a command shows its options.
"""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    "train": ("pretrain.train", "train (or continue) any method from a TOML recipe (DINOv2 by default)"),
    "distill": ("pretrain.distill", "distil a frozen teacher into one or more smaller students"),
    "eval": ("pretrain.eval.cli", "k-NN / linear-probe evaluation and feature export of any backbone"),
    "demo": ("infra.demo", "the end-to-end CPU demo (curation -> pretraining -> evaluation)"),
}


def usage() -> str:
    lines = ["usage: python -m pretrain <command> [options]", "", "commands:"]
    lines += [f"  {name:8} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
