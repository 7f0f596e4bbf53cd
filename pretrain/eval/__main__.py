"""``python -m pretrain.eval {knn,linear,features} ...`` (same as ``python -m pretrain eval ...``)."""

import sys

from .cli import main

sys.exit(main())
