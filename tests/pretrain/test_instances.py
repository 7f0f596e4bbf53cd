"""The instance index of memory-bank methods: every sample of the shards gets a stable row."""

from __future__ import annotations

import pytest
import torch

from pretrain.data.instances import InstanceIndex, shard_keys
from pretrain.data.wds import expand_shards
from pretrain.methods import get_method

from .trainer_utils import write_shards


def test_rows_cover_every_sample_once_and_survive_save_and_load(tmp_path):
    a = write_shards(tmp_path / "a", n=40, per_shard=16)  # 3 shards: 16 + 16 + 8
    b = write_shards(tmp_path / "b", n=10, per_shard=16)  # the same keys 000000.. in another set
    assert [len(shard_keys(u)) for u in expand_shards(a)] == [16, 16, 8]
    index = InstanceIndex.scan([a, b])
    assert len(index) == 50
    rows_a = index.rows([0] * 40, [f"{i:06d}" for i in range(40)])
    rows_b = index.rows(torch.ones(10, dtype=torch.long), [f"{i:06d}" for i in range(10)])
    assert rows_a.tolist() == list(range(40)) and rows_b.tolist() == list(range(40, 50))
    with pytest.raises(KeyError, match="'000010' of shard set 1"):
        index.rows([1], ["000010"])
    cache = tmp_path / "index.txt"
    index.save(cache)
    again = InstanceIndex.build([a, b], cache)
    assert len(again) == 50 and torch.equal(again.rows([1, 0], ["000003", "000039"]), torch.tensor([43, 39]))
    # a cache made from other shards is not trusted: the index is rescanned (and rewritten)
    other = InstanceIndex.build([a], cache)
    assert len(other) == 40 and len(InstanceIndex.load(cache)) == 40
    with pytest.raises(ValueError, match="at least 2 samples"):
        InstanceIndex(["x"], [["only"]])


def test_unknown_methods_name_the_known_ones():
    assert get_method("moco").name == "moco"
    with pytest.raises(ValueError, match="'nope' is unknown; known: .*dinov2"):
        get_method("nope")
