"""End to end: an official-layout checkpoint evaluated by the CLI on Fashion-MNIST WebDataset shards."""

import json

import pytest
import torch

from pretrain.eval import cli
from pretrain.eval import linear as linear_mod
from pretrain.eval import run as run_mod
from pretrain.eval.fashion_mnist import load_fashion_mnist, write_shards
from pretrain.models import build_backbone, export_backbone


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids spin-waiting on the shared CI cores."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    x, y = load_fashion_mnist("train", 600)
    write_shards(x, y, str(root / "train-%06d.tar"), maxcount=200)
    x, y = load_fashion_mnist("test", 200)
    write_shards(x, y, str(root / "test-%06d.tar"), maxcount=100)
    torch.manual_seed(0)
    # Random init; LayerScale 1.0 so the CLS token mixes in the image (DINOv2's 1e-5 init keeps it ~constant).
    model = build_backbone("vit_test", init_values=1.0)
    export_backbone(model, str(root / "vit_test.pth"))
    return {"root": root, "weights": str(root / "vit_test.pth"), "train": str(root / "train-{000000..000002}.tar"),
            "test": str(root / "test-{000000..000001}.tar")}


def _common(s, out):
    return ["--backbone", "vit_test", "--weights", s["weights"], "--train", s["train"], "--test", s["test"],
            "--image-size", "56", "--num-workers", "0", "--batch-size", "100", "--output", str(out)]


def test_knn_on_official_layout_checkpoint(setup, capsys):
    sd = torch.load(setup["weights"], weights_only=True)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.0.ls1.gamma",
            "norm.weight"} <= set(sd)
    out = setup["root"] / "knn"
    assert cli.main(["knn", *_common(setup, out)]) == 0
    res = json.loads((out / "knn.json").read_text())
    assert [r["k"] for r in res["results"]] == [10, 20, 100, 200]
    assert res["n_train"] == 600 and res["n_test"] == 200 and res["num_classes"] == 10
    top1 = {r["k"]: r["top1"] for r in res["results"]}
    assert top1[20] > 0.4  # chance is 0.1
    assert all(r["top5"] >= r["top1"] for r in res["results"])
    assert res["config"]["backbone"]["weights"] == setup["weights"]
    assert (out / "knn.config.toml").exists()
    printed = capsys.readouterr().out
    assert "k-NN (T=0.07, 600 train, 200 test, 10 classes)" in printed and f"{100 * top1[20]:.2f}%" in printed
    setup["knn_top1"] = top1


def test_features_export_then_knn_and_linear_from_the_file(setup):
    feats = setup["root"] / "feats" / "fmnist.parquet"
    assert cli.main(["features", *_common(setup, feats), "--mode", "lastn_avgpool", "--n-last-blocks", "2"]) == 0
    out = setup["root"] / "from_file"
    assert cli.main(["knn", "--features", str(feats), "--output", str(out)]) == 0
    res = json.loads((out / "knn.json").read_text())
    if "knn_top1" in setup:  # same CLS features as the direct run
        for r in res["results"]:
            assert r["top1"] == pytest.approx(setup["knn_top1"][r["k"]], abs=1.5 / 200)
    assert cli.main(["linear", "--features", str(feats), "--output", str(out), "--epochs", "20",
                     "--lrs", "0.01", "0.1", "1.0", "--linear-batch-size", "32"]) == 0
    lin = json.loads((out / "linear.json").read_text())
    # 32-d random-init features, 600 train images: ~45-50% measured; chance is 10%.
    assert lin["test_top1"] > 0.3 and lin["n_test"] == 200 and len(lin["selection"]["grid"]) == 4 * 3
    assert lin["selection"]["n_fit"] + lin["selection"]["n_holdout"] == 600


def test_linear_cli_opens_the_test_split_only_after_selection(setup, monkeypatch):
    events = []
    real_open, real_select = run_mod.open_dataset, linear_mod.select_linear_head

    def spy_open(source, **kw):
        events.append(("open", source))
        return real_open(source, **kw)

    def spy_select(train, cfg):
        out = real_select(train, cfg)
        events.append(("selected", out.feature_set))
        return out

    monkeypatch.setattr(run_mod, "open_dataset", spy_open)
    monkeypatch.setattr(linear_mod, "select_linear_head", spy_select)
    out = setup["root"] / "linear"
    assert cli.main(["linear", *_common(setup, out), "--limit", "300", "--n-last-blocks", "2", "--epochs", "3",
                     "--lrs", "0.1", "1.0"]) == 0
    assert [e[0] for e in events] == ["open", "selected", "open"]
    assert events[0][1] == setup["train"] and events[2][1] == setup["test"]
    lin = json.loads((out / "linear.json").read_text())
    assert lin["n_train"] == 300 and lin["n_test"] == 200 and lin["config"]["linear"]["n_last_blocks"] == 2


def test_cli_errors_and_help(setup, capsys):
    assert cli.main(["knn", "--backbone", "vit_test", "--train", setup["train"], "--output", "x"]) == 2
    assert "data.train and data.test are both required" in capsys.readouterr().err
    args = _common(setup, setup["root"] / "bad")
    args[args.index("--image-size") + 1] = "50"
    assert cli.main(["knn", *args]) == 2
    assert "must be a multiple of the backbone patch size 14" in capsys.readouterr().err
    assert cli.main(["linear", *_common(setup, setup["root"] / "bad"), "--set", "linear.epochs=0"]) == 2
    assert "epochs must be > 0" in capsys.readouterr().err
    assert cli.main(["knn", "--features", str(setup["root"] / "missing.parquet"), "--output", "x"]) == 2
    assert "missing.parquet does not exist" in capsys.readouterr().err
    missing_weights = ["--weights", str(setup["root"] / "missing.pth")]
    assert cli.main(["knn", *_common(setup, setup["root"] / "bad"), *missing_weights]) == 2
    assert "missing.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["knn", "--help"])
    assert exc.value.code == 0
    assert "Weighted k-NN (cosine, T=0.07" in capsys.readouterr().out


def test_toml_config_and_dotted_overrides(setup, tmp_path):
    feats = setup["root"] / "feats" / "fmnist.parquet"
    if not feats.exists():
        assert cli.main(["features", *_common(setup, feats), "--mode", "cls"]) == 0
    cfg = tmp_path / "eval.toml"
    cfg.write_text(f'features = "{feats}"\noutput_dir = "{tmp_path / "out"}"\n\n[knn]\nks = [5, 50]\n')
    assert cli.main(["knn", "--config", str(cfg), "--set", "knn.temperature=0.5"]) == 0
    res = json.loads((tmp_path / "out" / "knn.json").read_text())
    assert [r["k"] for r in res["results"]] == [5, 50] and res["temperature"] == 0.5
    assert res["config"]["knn"] == {"ks": [5, 50], "temperature": 0.5, "chunk_size": 256}
    cfg.write_text(f'features = "{feats}"\n[knn]\nkz = [5]\n')
    assert cli.main(["knn", "--config", str(cfg)]) == 2  # unknown field -> clear error, nothing written


def test_dinov2_training_checkpoint_and_sidecar_weights(setup, tmp_path):
    """A DINOv2 ``teacher_checkpoint.pth`` (``{"teacher": {"backbone.*": ...}}``) evaluates like the export, and an
    export's ``.json`` sidecar makes ``--backbone`` optional."""
    sd = torch.load(setup["weights"], weights_only=True)
    wrapped = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                           "dino_head.last_layer.weight_g": torch.ones(8, 1)}}
    torch.save(wrapped, tmp_path / "teacher_checkpoint.pth")
    results = []
    for weights, backbone in ((str(tmp_path / "teacher_checkpoint.pth"), ["--backbone", "vit_test"]),
                              (setup["weights"], [])):
        out = tmp_path / f"out{len(results)}"
        assert cli.main(["knn", *backbone, "--weights", weights, "--train", setup["train"], "--test", setup["test"],
                         "--image-size", "56", "--num-workers", "0", "--limit", "150", "--ks", "10",
                         "--output", str(out)]) == 0
        results.append(json.loads((out / "knn.json").read_text())["results"][0]["top1"])
    assert results[0] == results[1] and results[0] > 0.3
