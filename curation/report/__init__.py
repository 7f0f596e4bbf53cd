"""The visual report of a curation run: ``report/index.html`` + PNGs that open offline.

:mod:`curation.report.stage` holds the ``report`` stage (registered by :mod:`curation.stages`),
:mod:`curation.report.draw` the Pillow-only charts and montages.
"""
