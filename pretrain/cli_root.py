"""The ``dinoforge`` console script: ``dinoforge curation ...``, ``dinoforge pretrain ...``, ``dinoforge demo``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dinoforge {curation,pretrain,demo} ...\n"
              "  curation ...   same as python -m curation ...\n"
              "  pretrain ...   same as python -m pretrain ...\n"
              "  demo [--out D] the end-to-end CPU demo")
        return 0
    head, rest = argv[0], argv[1:]
    if head == "curation":
        from curation.__main__ import main as curation_main

        return int(curation_main(rest) or 0)
    if head == "pretrain":
        from pretrain.__main__ import main as pretrain_main

        return pretrain_main(rest)
    if head == "demo":
        from pretrain.__main__ import main as pretrain_main

        return pretrain_main(["demo", *rest])
    print(f"unknown command {head!r}; try dinoforge --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
