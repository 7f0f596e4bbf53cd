"""``python -m curation run|stage|lineage`` (see :mod:`curation.cli`)."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main())
