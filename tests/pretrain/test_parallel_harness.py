"""The shared gloo test harness (tests/_dist.py) reports failures instead of hanging or passing silently."""

from __future__ import annotations

import pytest

from tests._dist import DistributedTestError, run_distributed


def _fail_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def test_an_exception_in_one_rank_fails_with_its_traceback():
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 failed:.*ValueError: boom on purpose"):
        run_distributed(_fail_on_rank_1, world_size=2)

