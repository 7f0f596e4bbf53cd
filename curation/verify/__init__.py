"""Local-feature verification of candidate copy pairs (pure: no Ray).

The descriptor proposes candidate pairs; :func:`extract` computes each image's :class:`LocalFeatures` once (SIFT on
a grayscale image downscaled to ``max_side``, cacheable as bytes) and :func:`check_pair` decides a pair: ratio-test
matches, a RANSAC model constrained to plausible copy transforms (also against the mirror image), spread-out
inliers and dense agreement of aligned thumbnails. Settings: :class:`curation.config.VerifyConfig`
(``dedupe.verification``); calibration: ``python bench/copy_verify.py``.
"""

from curation.config import VerifyConfig
from curation.verify.features import LocalFeatures, extract
from curation.verify.geometry import PairCheck, check_pair

__all__ = ["LocalFeatures", "PairCheck", "VerifyConfig", "check_pair", "extract"]
