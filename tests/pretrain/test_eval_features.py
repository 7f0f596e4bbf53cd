"""Feature modes from a real backbone, deterministic extraction, Parquet export and load."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pretrain.eval.datasets import make_loader, open_dataset
from pretrain.eval.fashion_mnist import load_fashion_mnist, write_shards
from pretrain.eval.features import (
    FeatureSet,
    check_backbone,
    compute_features,
    extract_features,
    load_features,
    read_feature_metadata,
    save_features,
)
from pretrain.eval.transforms import EvalTransform
from pretrain.models import build_backbone


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids spin-waiting on the shared CI cores."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_backbone("vit_test", init_values=1.0, num_register_tokens=2).eval()


def test_modes_match_the_backbone_outputs(model):
    x = torch.randn(3, 3, 56, 56)
    d = model.embed_dim
    with torch.inference_mode():
        out = model.forward_features(x)
        cls = compute_features(model, x, "cls")
        lastn = compute_features(model, x, "lastn", 2)
        full = compute_features(model, x, "lastn_avgpool", 2)
        pool = compute_features(model, x, "avgpool")
    assert cls.shape == (3, d) and lastn.shape == (3, 2 * d) and full.shape == (3, 3 * d) and pool.shape == (3, d)
    torch.testing.assert_close(cls, out["x_norm_clstoken"])
    torch.testing.assert_close(lastn[:, d:], cls, rtol=1e-5, atol=1e-5)  # last block CLS comes last
    torch.testing.assert_close(full[:, :2 * d], lastn)
    # mean over patch tokens only (the 2 register tokens are excluded)
    torch.testing.assert_close(pool, out["x_norm_patchtokens"].mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[:, 2 * d:], pool)
    assert not torch.allclose(lastn[:, :d], cls)  # the first block's CLS differs
    fs = FeatureSet(features=full, labels=torch.zeros(3, dtype=torch.int64), keys=list("abc"),
                    mode="lastn_avgpool", embed_dim=d, n_last_blocks=2)
    torch.testing.assert_close(fs.features[:, fs.cls_columns()], full[:, d:2 * d])


def test_backbone_checks_name_the_setting(model):
    with pytest.raises(ValueError, match="image_size 50 must be a multiple of the backbone patch size 14"):
        check_backbone(model, 50, "cls", 1)
    with pytest.raises(ValueError, match="n_last_blocks 4 exceeds the backbone's 2 blocks"):
        check_backbone(model, 56, "lastn_avgpool", 4)


def test_extraction_order_workers_precision_and_parquet_roundtrip(model, tmp_path):
    images, labels = load_fashion_mnist("train", 90)
    write_shards(images, labels, str(tmp_path / "s-%06d.tar"), maxcount=30)
    ds = open_dataset(str(tmp_path / "s-{000000..000002}.tar"), transform=EvalTransform(56))
    a = extract_features(model, make_loader(ds, 16, 0), mode="lastn_avgpool", n_last_blocks=2, device="cpu")
    b = extract_features(model, make_loader(ds, 7, 2), mode="lastn_avgpool", n_last_blocks=2, device="cpu")
    assert a.keys == b.keys == [f"{i:06d}" for i in range(90)]
    assert a.labels.tolist() == labels.tolist()
    torch.testing.assert_close(a.features, b.features, rtol=1e-5, atol=1e-5)
    assert a.embed_dim == 32 and a.n_last_blocks == 2 and a.features.shape == (90, 96)
    model.train()
    bf16 = extract_features(model, make_loader(ds, 32, 0), mode="cls", device="cpu", precision="bf16")
    assert model.training  # the caller's mode is restored
    model.eval()
    assert bf16.features.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(bf16.features, a.features[:, a.cls_columns()]).min()
    assert cos > 0.98

    path = str(tmp_path / "out" / "features.parquet")
    test = FeatureSet(features=a.features[:10] + 1, labels=a.labels[:10], keys=[f"t{i}" for i in range(10)],
                      mode="lastn_avgpool", embed_dim=32, n_last_blocks=2)
    save_features({"train": a, "test": test}, path, extra={"backbone": {"name": "vit_test"}})
    table = pq.read_table(path)
    assert table.column_names == ["key", "label", "split", "feature"]
    ftype = table.schema.field("feature").type
    assert pa.types.is_fixed_size_list(ftype) and ftype.list_size == 96 and ftype.value_type == pa.float32()
    meta = read_feature_metadata(path)
    assert meta["splits"] == ["train", "test"] and meta["backbone"] == {"name": "vit_test"}
    back = load_features(path, "train")
    assert back.keys == a.keys and back.labels.tolist() == a.labels.tolist()
    np.testing.assert_array_equal(back.features.numpy(), a.features.numpy())
    assert (back.mode, back.embed_dim, back.n_last_blocks) == ("lastn_avgpool", 32, 2)
    assert load_features(path, "test").keys == test.keys
    with pytest.raises(ValueError, match="not 'val'"):
        load_features(path, "val")


def test_featureset_rejects_inconsistent_layouts():
    with pytest.raises(ValueError, match="do not match mode"):
        FeatureSet(features=torch.zeros(2, 10), labels=torch.zeros(2, dtype=torch.int64), keys=["a", "b"],
                   mode="lastn", embed_dim=4, n_last_blocks=2)
    fs = FeatureSet(features=torch.zeros(2, 4), labels=torch.zeros(2, dtype=torch.int64), keys=["a", "b"],
                    mode="avgpool", embed_dim=4)
    with pytest.raises(ValueError, match="no CLS token"):
        fs.cls_columns()
