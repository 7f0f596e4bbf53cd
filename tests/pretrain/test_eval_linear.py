"""Linear probe: selection on a train hold-out that never reads the reported split; accuracy on separable data."""

import pytest
import torch

from pretrain.eval import linear as linear_mod
from pretrain.eval.config import LinearConfig
from pretrain.eval.features import FeatureSet
from pretrain.eval.linear import feature_sets, holdout_split, run_linear_probe, select_linear_head

D, N_BLOCKS, C = 8, 2, 5


def _synthetic(n, seed, informative="avgpool"):
    """lastn_avgpool features (2 blocks x CLS + avgpool, D=8 each): only the chosen part carries the class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    x = torch.randn(n, (N_BLOCKS + 1) * D, generator=g)
    means = torch.eye(C, D) * 6.0
    if informative == "avgpool":
        x[:, N_BLOCKS * D:] += means[labels]
    else:  # the first block's CLS
        x[:, :D] += means[labels]
    return FeatureSet(features=x, labels=labels, keys=[str(i) for i in range(n)], mode="lastn_avgpool",
                      embed_dim=D, n_last_blocks=N_BLOCKS)


CFG = LinearConfig(learning_rates=[1e-4, 1e-2, 1.0], epochs=8, batch_size=64, device="cpu")


def test_feature_set_layout():
    fs = _synthetic(10, 0)
    assert feature_sets(fs) == {"last1_cls": slice(8, 16), "last1_cls_avgpool": slice(8, 24),
                                "last2_cls": slice(0, 16), "last2_cls_avgpool": slice(0, 24)}
    cls_only = FeatureSet(features=fs.features[:, :D], labels=fs.labels, keys=fs.keys, mode="cls", embed_dim=D)
    assert feature_sets(cls_only) == {"last1_cls": slice(0, 8)}


def test_high_accuracy_on_separable_features_and_the_informative_set_is_chosen():
    train, test = _synthetic(400, 0), _synthetic(200, 1)
    result = run_linear_probe(train, lambda: test, CFG)
    assert result.test_top1 > 0.97
    assert result.selection.feature_set in ("last1_cls_avgpool", "last2_cls_avgpool")
    assert len(result.selection.grid) == 4 * 3
    grid = {(r["feature_set"], r["lr"]): r["holdout_top1"] for r in result.selection.grid}
    assert grid[("last1_cls", 1e-2)] < 0.5  # the CLS parts are noise here
    # Information only in the FIRST block's CLS: only the last-2 sets can see it.
    result = run_linear_probe(_synthetic(400, 0, "cls"), lambda: _synthetic(200, 1, "cls"), CFG)
    assert result.selection.feature_set.startswith("last2_cls") and result.test_top1 > 0.97
    d = result.to_dict()
    assert d["selection"]["n_fit"] + d["selection"]["n_holdout"] == d["n_train"] == 400 and d["n_test"] == 200


def test_reported_split_is_loaded_once_and_only_after_selection(monkeypatch):
    events = []
    real_select = linear_mod.select_linear_head

    def spy_select(train, cfg):
        events.append("select-start")
        out = real_select(train, cfg)
        events.append("select-done")
        return out

    monkeypatch.setattr(linear_mod, "select_linear_head", spy_select)

    def load_test():
        assert events == ["select-start", "select-done"], "test split requested before the selection was final"
        events.append("load-test")
        return _synthetic(100, 5)

    run_linear_probe(_synthetic(300, 0), load_test, CFG)
    assert events == ["select-start", "select-done", "load-test"]


def test_test_labels_cannot_change_the_selection():
    train, test = _synthetic(300, 0), _synthetic(150, 1)
    shuffled = FeatureSet(features=torch.randn_like(test.features), labels=test.labels.flip(0), keys=test.keys,
                          mode=test.mode, embed_dim=D, n_last_blocks=N_BLOCKS)
    a = run_linear_probe(train, lambda: test, CFG)
    b = run_linear_probe(train, lambda: shuffled, CFG)
    assert a.selection.grid == b.selection.grid
    assert (a.selection.feature_set, a.selection.lr) == (b.selection.feature_set, b.selection.lr)
    assert a.test_top1 > 0.95 and b.test_top1 < 0.5  # the reported number did change


def test_select_only_sees_train_and_refit_flag():
    train = _synthetic(300, 0)
    sel = select_linear_head(train, CFG)
    assert sel.n_fit + sel.n_holdout == 300 and sel.holdout_top1 == max(r["holdout_top1"] for r in sel.grid)
    kept = run_linear_probe(train, lambda: _synthetic(100, 2), LinearConfig(**{**CFG.__dict__, "refit": False}))
    assert kept.refit is False and kept.test_top1 > 0.95


def test_holdout_split_is_stratified_disjoint_and_seeded():
    labels = torch.arange(203) % 7
    fit, hold = holdout_split(labels, 0.1, seed=3)
    assert set(fit.tolist()).isdisjoint(hold.tolist()) and len(fit) + len(hold) == 203
    assert torch.bincount(labels[hold], minlength=7).tolist() == [3] * 7
    fit2, hold2 = holdout_split(labels, 0.1, seed=3)
    assert torch.equal(hold, hold2) and not torch.equal(hold, holdout_split(labels, 0.1, seed=4)[1])
    with pytest.raises(ValueError, match="holdout_fraction"):
        holdout_split(torch.arange(4), 0.1, seed=0)  # one sample per class: nothing to hold out


def test_unknown_feature_set_and_config_errors_name_the_field():
    with pytest.raises(ValueError, match="linear.feature_sets"):
        select_linear_head(_synthetic(50, 0), LinearConfig(feature_sets=["last4_cls"], device="cpu"))
    for kwargs, field in (({"learning_rates": []}, "learning_rates"), ({"epochs": 0}, "epochs"),
                          ({"holdout_fraction": 1.0}, "holdout_fraction"), ({"momentum": 1.0}, "momentum"),
                          ({"n_last_blocks": 0}, "n_last_blocks"), ({"device": "tpu"}, "device")):
        with pytest.raises(ValueError, match=field):
            LinearConfig(**kwargs)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one intra-op thread avoids spin-waiting on the shared CI cores."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
