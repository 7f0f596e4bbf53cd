"""The visual report of a curation run: ``report/index.html`` + PNGs that open offline.

The ``report`` stage is :mod:`curation.stages.report` (registered with the other stages by
:mod:`curation.stages`); :mod:`curation.report.draw` holds its Pillow-only charts and montages,
:mod:`curation.report.tables` its HTML tables (settings, funnel, stage counts).
"""
