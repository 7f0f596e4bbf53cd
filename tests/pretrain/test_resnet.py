"""ResNet backbones: shapes, torchvision parameter counts and key layout (strict load of an independently written
key list, outputs equal to a functional reference forward), BN/SyncBN, the consumers (k-NN eval, curation
embedder, distillation) and per-stage FSDP2 on 2 real gloo processes against the single-process result."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pretrain.models import ResNet, ResNetConfig, backbone_names, build_backbone, export_backbone
from tests._dist import run_distributed

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models on a shared 2-core machine: one intra-op thread avoids spin-waiting."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ------------------------------------------------------------------------------------------- torchvision layout
def torchvision_shapes(depth: int, num_classes: int = 1000, small: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's ``resnet{depth}`` state dict, written from the architecture definition."""
    shapes: dict[str, tuple[int, ...]] = {}

    def norm(prefix: str, c: int) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{leaf}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 3, 3) if small else (64, 3, 7, 7)
    norm("bn1", 64)
    bottleneck = depth >= 50
    cin = 64
    for i, n in enumerate(BLOCKS[depth]):
        planes = 64 * 2**i
        cout = planes * (4 if bottleneck else 1)
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            if bottleneck:
                shapes[f"{p}.conv1.weight"] = (planes, cin, 1, 1)
                norm(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                norm(f"{p}.bn2", planes)
                shapes[f"{p}.conv3.weight"] = (cout, planes, 1, 1)
                norm(f"{p}.bn3", cout)
            else:
                shapes[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
                norm(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                norm(f"{p}.bn2", planes)
            if j == 0 and (i > 0 or cin != cout):
                shapes[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
                norm(f"{p}.downsample.1", cout)
            cin = cout
    if num_classes:
        shapes["fc.weight"] = (num_classes, cin)
        shapes["fc.bias"] = (num_classes,)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of sensible scale under the given keys (He-scaled convs, non-trivial norm statistics)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bias")):
            sd[k] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # norm gamma
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = int(np.prod(shape[1:]))
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return sd


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int, small: bool) -> torch.Tensor:
    """Eval-mode torchvision ResNet written with functional ops on the state dict (logits, or the pooled feature)."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    def conv(t: torch.Tensor, p: str, stride: int = 1) -> torch.Tensor:
        w = sd[f"{p}.weight"]
        return F.conv2d(t, w, stride=stride, padding=w.shape[-1] // 2)

    x = F.relu(bn(conv(x, "conv1", 1 if small else 2), "bn1"))
    if not small:
        x = F.max_pool2d(x, 3, 2, 1)
    for i, n in enumerate(BLOCKS[depth]):
        for j in range(n):
            p, s = f"layer{i + 1}.{j}", 2 if i > 0 and j == 0 else 1
            if depth >= 50:  # stride in the 3x3 convolution
                y = F.relu(bn(conv(x, f"{p}.conv1"), f"{p}.bn1"))
                y = F.relu(bn(conv(y, f"{p}.conv2", s), f"{p}.bn2"))
                y = bn(conv(y, f"{p}.conv3"), f"{p}.bn3")
            else:
                y = F.relu(bn(conv(x, f"{p}.conv1", s), f"{p}.bn1"))
                y = bn(conv(y, f"{p}.conv2"), f"{p}.bn2")
            short = bn(conv(x, f"{p}.downsample.0", s), f"{p}.downsample.1") if f"{p}.downsample.0.weight" in sd else x
            x = F.relu(y + short)
    x = x.mean(dim=(2, 3))
    return F.linear(x, sd["fc.weight"], sd["fc.bias"]) if "fc.weight" in sd else x


# ------------------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize(("depth", "dim"), [(18, 512), (50, 2048)])
@pytest.mark.parametrize(("stem", "size", "grid"), [("imagenet", 64, 2), ("small", 32, 4)])
def test_output_shapes(depth, dim, stem, size, grid):
    name = f"resnet{depth}" + ("_small" if stem == "small" else "")
    model = build_backbone(name).eval()
    assert name in backbone_names() and model.embed_dim == dim and model.cfg.stem == stem
    assert model.feature_stride == size // grid and model.n_blocks == BLOCKS[depth][-1]
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        out = model.forward_features(x)
        pooled = model(x)
        layers = model.get_intermediate_layers(x, 2, return_class_token=True)
        maps = model.get_intermediate_layers(x, [0], reshape=True)
    assert out["x_norm_clstoken"].shape == (2, dim)
    assert out["x_norm_patchtokens"].shape == (2, grid * grid, dim)
    assert out["x_norm_regtokens"].shape == (2, 0, dim)
    assert out["x_prenorm"].shape == (2, 1 + grid * grid, dim) and out["masks"] is None
    torch.testing.assert_close(pooled, out["x_norm_clstoken"])
    torch.testing.assert_close(out["x_norm_patchtokens"].mean(1), pooled)
    assert [tuple(p.shape) for p, _ in layers] == [(2, grid * grid, dim)] * 2
    torch.testing.assert_close(layers[-1][1], pooled)  # the last block's "class token" is the pooled feature
    assert maps[0].shape == (2, dim, grid, grid)
    logits = ResNet(ResNetConfig(depth=depth, stem=stem, num_classes=10)).eval()(x)
    assert logits.shape == (2, 10)
    assert model.forward_features_list([x, x[:, :, : size // 2, : size // 2]])[1]["x_norm_clstoken"].shape == (2, dim)


@pytest.mark.parametrize(("depth", "params"), [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032),
                                               (101, 44_549_160)])
def test_parameter_counts_equal_torchvision(depth, params):
    with torch.device("meta"):
        model = ResNet(ResNetConfig(depth=depth, num_classes=1000))
        backbone = build_backbone(f"resnet{depth}")
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(p.numel() for p in backbone.parameters()) == params - (1000 * backbone.embed_dim + 1000)  # no fc


def test_options_zero_init_drop_path_and_errors():
    model = ResNet(ResNetConfig(depth=50, width=8, zero_init_residual=True))
    last = [blk.bn3.weight for stage in model.stages for blk in stage]
    assert all(torch.count_nonzero(w) == 0 for w in last) and torch.all(model.layer1[0].bn1.weight == 1)
    x = torch.randn(2, 3, 32, 32)
    dropped = build_backbone("resnet_test", drop_path_rate=0.5).train()
    torch.manual_seed(0)
    a = dropped(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, dropped(x))  # different branches dropped
    plain = build_backbone("resnet_test")
    plain.load_state_dict(dropped.state_dict())
    torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))  # no drop in eval mode
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNetConfig(depth=42)
    with pytest.raises(ValueError, match="stem"):
        ResNetConfig(stem="cifar")
    with pytest.raises(ValueError, match="unknown backbone override"):
        build_backbone("resnet18", patch_size=14)
    with pytest.raises(ValueError, match="ibot_weight"):
        dropped.forward_features(x, masks=torch.ones(2, 16, dtype=torch.bool))


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(("depth", "small"), [(18, False), (50, False), (18, True)])
def test_torchvision_keys_load_strictly_and_compute_like_the_reference(depth, small, tmp_path):
    shapes = torchvision_shapes(depth, small=small)
    model = ResNet(ResNetConfig(depth=depth, num_classes=1000, stem="small" if small else "imagenet"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    sd = random_state(shapes)
    model.load_state_dict(sd, strict=True)
    model.eval()
    x = torch.randn(2, 3, 32 if small else 64, 32 if small else 64)
    with torch.inference_mode():
        logits = model(x)
        torch.testing.assert_close(logits, reference_forward(sd, x, depth, small), rtol=1e-4, atol=1e-4)

        # the same file through the factory: fc kept with num_classes, dropped (backbone) without
        name = f"resnet{depth}" + ("_small" if small else "")
        torch.save(sd, tmp_path / "tv.pth")
        with_fc = build_backbone(name, weights=str(tmp_path / "tv.pth"), num_classes=1000).eval()
        assert torch.equal(with_fc(x), logits)
        backbone = build_backbone(name, weights=str(tmp_path / "tv.pth")).eval()
        assert not any(k.startswith("fc.") for k in backbone.state_dict())
        feats = backbone(x)
        torch.testing.assert_close(feats, model.forward_features(x)["x_norm_clstoken"], rtol=0, atol=0)

        # export (torchvision keys + sidecar) and back without a name
        export_backbone(with_fc, str(tmp_path / "out.pth"))
        meta = json.loads((tmp_path / "out.pth.json").read_text())
        assert meta["name"] == name and meta["format"] == "torchvision-resnet"
        saved = torch.load(tmp_path / "out.pth", weights_only=True)
        assert {k: tuple(v.shape) for k, v in saved.items()} == shapes
        again = build_backbone(None, weights=str(tmp_path / "out.pth")).eval()
        assert torch.equal(again(x), logits)


def test_legacy_dino_and_mismatched_checkpoints(tmp_path):
    shapes = torchvision_shapes(18, num_classes=0)
    sd = random_state(shapes, seed=1)
    x = torch.randn(1, 3, 64, 64)
    want = reference_forward(sd, x, 18, small=False)
    # legacy torchvision files have no num_batches_tracked
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / "legacy.pth")
    # DINO's ResNet teacher: DDP-wrapped MultiCropWrapper -> module.backbone.* (+ its head)
    dino = {**{f"module.backbone.{k}": v for k, v in sd.items()}, "module.head.mlp.0.weight": torch.zeros(4, 512)}
    torch.save({"teacher": dino, "epoch": 100}, tmp_path / "checkpoint.pth")
    for file in ("legacy.pth", "checkpoint.pth"):
        model = build_backbone("resnet18", weights=str(tmp_path / file)).eval()
        with torch.inference_mode():
            torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="mis-shaped keys.*conv1.weight"):
        build_backbone("resnet18_small", weights=str(tmp_path / "legacy.pth"))
    with pytest.raises(ValueError, match="missing keys.*fc.weight"):
        build_backbone("resnet18", weights=str(tmp_path / "legacy.pth"), num_classes=1000)


def test_bn_and_syncbn_construct_and_agree():
    bn = build_backbone("resnet_test").eval()
    sync = build_backbone("resnet_test", norm="syncbn").eval()
    norms = [m for m in bn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    syncs = [m for m in sync.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(norms) == len(syncs) == 20 and all(type(m) is nn.BatchNorm2d for m in norms)
    sync.load_state_dict(bn.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(sync(x), bn(x))
    # train mode without a process group: SyncBatchNorm falls back to local batch statistics
    torch.testing.assert_close(sync.train()(x), bn.train()(x))
    torch.testing.assert_close(sync.layer1[0].bn1.running_mean, bn.layer1[0].bn1.running_mean)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bn))
    assert set(converted.state_dict()) == set(bn.state_dict())


# ------------------------------------------------------------------------------------------- consumers
def _folder(root, n_per_class: int = 4) -> str:
    """A tiny image folder: class 'dark' (low values) and 'bright' (high values)."""
    rng = np.random.default_rng(0)
    for cls, lo in (("dark", 0), ("bright", 160)):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(lo, lo + 96, size=(40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return str(root)


def test_knn_eval_features_and_linear_layouts_accept_a_resnet(tmp_path):
    from pretrain.eval.config import DataConfig, ExtractConfig, KnnConfig
    from pretrain.eval.features import check_backbone, compute_features
    from pretrain.eval.run import knn_eval_model

    torch.manual_seed(0)
    model = build_backbone("resnet_test").eval()
    folder = _folder(tmp_path / "imgs")
    data = DataConfig(train=folder, test=folder, image_size=32, resize_size=36)
    result = knn_eval_model(model, data, ExtractConfig(batch_size=3, num_workers=0, device="cpu"),
                            KnnConfig(ks=[1, 3]))
    assert result.top1[0] == 1.0  # each test image is its own nearest train neighbour
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        full = compute_features(model, x, "lastn_avgpool", 2)
        assert full.shape == (2, 3 * model.embed_dim)
        torch.testing.assert_close(full[:, model.embed_dim:2 * model.embed_dim], model(x))
    with pytest.raises(ValueError, match="n_last_blocks 4 exceeds the backbone's 2 blocks"):
        check_backbone(model, 32, "lastn_avgpool", 4)


def test_curation_embedder_accepts_a_resnet():
    from curation.config import EmbedConfig
    from curation.models import build_embedder

    emb = build_embedder(EmbedConfig(model="backbone", name="resnet_test", image_size=32, device="cpu"))
    assert emb.dim == 64
    batch = np.random.default_rng(0).integers(0, 255, size=(3, 32, 32, 3), dtype=np.uint8)
    out = emb.embed(batch)
    assert out.shape == (3, 64) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_distillation_into_a_resnet_student(tmp_path):
    from pretrain.models.heads import HeadsConfig, build_heads
    from pretrain.ssl.distill_arch import DistillMetaArch, StudentConfig, TeacherConfig
    from pretrain.ssl.meta_arch import LossConfig

    torch.manual_seed(0)
    vit = build_backbone("vit_test", patch_size=7, img_size=28)
    heads_cfg = HeadsConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8)
    heads = nn.ModuleDict(build_heads(heads_cfg, vit.embed_dim))
    export_backbone(vit, str(tmp_path / "teacher.pth"), name="vit_test")
    torch.save({"heads": heads.state_dict(), "centers": {}, "heads_config": {}}, tmp_path / "teacher_heads.pth")
    teacher = TeacherConfig(weights=str(tmp_path / "teacher.pth"))
    students = [StudentConfig(name="r", arch="resnet_test")]
    with pytest.raises(ValueError, match="ibot_weight = 0"):
        DistillMetaArch(teacher, students, LossConfig(ibot_weight=1.0))
    arch = DistillMetaArch(teacher, students, LossConfig(ibot_weight=0.0), feature_weight=1.0).train()
    batch = {"global_crops": torch.randn(4, 3, 28, 28), "local_crops": torch.randn(4, 3, 14, 14)}
    loss, out = arch.compute_losses(batch, teacher_temp=0.04)
    assert torch.isfinite(loss) and {"r/dino", "r/koleo", "r/feature"} <= set(out["losses"])
    loss.backward()
    student = arch.students["r"]["backbone"]
    assert student.layer4[1].conv2.weight.grad is not None
    ema = arch.emas["r"]["backbone"]
    assert torch.equal(ema.bn1.running_mean, torch.zeros(8))
    arch.update_teacher(0.5)  # the EMA follows the student's BatchNorm statistics too
    torch.testing.assert_close(ema.bn1.running_mean, 0.5 * student.bn1.running_mean)
    assert torch.equal(ema.bn1.num_batches_tracked, student.bn1.num_batches_tracked)


# ------------------------------------------------------------------------------------------- parallel
def test_plan_shards_a_resnet_per_stage():
    from pretrain.parallel.plan import plan_sharding

    def build() -> nn.Module:
        return build_backbone("resnet50", num_classes=1000)

    plan = plan_sharding(build, world_size=8, rank=3)
    units = {u.name: u for u in plan.units}
    assert plan.numel == 25_557_032
    for stage in ("conv1", "layer1", "layer2", "layer3", "layer4", "fc"):
        assert units[stage].compute_dtype == "bfloat16"
    norms = [u for u in plan.units if u.compute_dtype == "float32"]  # one fp32 unit of norms per stage
    assert sorted(u.name.split(".")[0] for u in norms) == ["bn1", "layer1", "layer2", "layer3", "layer4"]
    norm_params = [p for m in build().modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert sum(u.numel for u in norms) == sum(p.numel() for p in norm_params)
    fp32 = plan_sharding(build, world_size=2, mp_policy="fp32")
    assert [u.name for u in fp32.units] == ["", "conv1+bn1", "layer1", "layer2", "layer3", "layer4", "fc"]


def test_activation_checkpointing_is_refused_for_resnets():
    from pretrain.parallel import parallelize

    with pytest.raises(ValueError, match="running statistics"):
        parallelize(nn.ModuleDict({"backbone": build_backbone("resnet_test")}), activation_checkpointing=True)


STEPS = 3


def _sgd_run(model: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, y in zip(xs, ys):
        loss = (model(x).float() - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def _fsdp_run(rank: int, world_size: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from pretrain.checkpoint import full_state_dict
    from pretrain.parallel import device_mesh, get_dist_info, parallelize

    mesh = device_mesh(get_dist_info())
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(STEPS)]
    ys = [torch.randn(4, 10, generator=g) for _ in range(STEPS)]
    torch.manual_seed(0)
    base = build_backbone("resnet_test", num_classes=10)
    result: dict = {}

    def mean(t: torch.Tensor) -> float:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t.item() / world_size

    def max_diff(full: dict, ref: nn.Module) -> float:
        ref_sd = ref.state_dict()
        assert set(full) == set(ref_sd), sorted(set(full) ^ set(ref_sd))
        return max((full[k].double() - ref_sd[k].double()).abs().max().item() for k in ref_sd)

    # 1. eval-mode norms, batch split over the ranks: sharded steps == full-batch steps in one process
    ref = copy.deepcopy(base).eval()
    model = parallelize(copy.deepcopy(base), mesh=mesh, mp_policy="fp32", forward_methods=("forward_features",))
    model.eval()
    result["units"] = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))
    losses = _sgd_run(model, [x.chunk(world_size)[rank] for x in xs], [y.chunk(world_size)[rank] for y in ys])
    result["eval_losses"] = [mean(v) for v in losses]
    result["eval_ref_losses"] = [v.item() for v in _sgd_run(ref, xs, ys)]
    result["eval_param_diff"] = max_diff(full_state_dict(model, rank0_only=False), ref)
    with torch.no_grad():
        local = xs[0].chunk(world_size)[rank]
        got, want = model.forward_features(local), ref.forward_features(local)
        result["features_diff"] = (got["x_norm_patchtokens"] - want["x_norm_patchtokens"]).abs().max().item()

    # 2. train-mode norms, the same full batch on every rank: batch statistics and running stats match too
    ref = copy.deepcopy(base).train()
    model = parallelize(copy.deepcopy(base), mesh=mesh, mp_policy="fp32").train()
    result["train_losses"] = [mean(v) for v in _sgd_run(model, xs, ys)]
    result["train_ref_losses"] = [v.item() for v in _sgd_run(ref, xs, ys)]
    result["train_param_diff"] = max_diff(full_state_dict(model, rank0_only=False), ref)

    # 3. bf16 policy: convolutions in bf16, norms with fp32 parameters on bf16 activations, fp32 master state
    ref = copy.deepcopy(base).train()
    model = parallelize(copy.deepcopy(base), mesh=mesh, mp_policy="bf16").train()
    seen: dict[str, list[str]] = {}

    def record(key: str, m: nn.Module, i: tuple, o: torch.Tensor) -> None:
        seen.setdefault(key, [str(i[0].dtype), str(m.weight.dtype), str(o.dtype)])

    model.layer2[0].bn1.register_forward_hook(lambda m, i, o: record("norm", m, i, o))
    model.layer2[0].conv2.register_forward_hook(lambda m, i, o: record("conv", m, i, o))
    loss = _sgd_run(model, xs[:1], ys[:1])[0]
    result["bf16_seen"] = seen
    result["bf16_loss"], result["bf16_ref_loss"] = mean(loss), _sgd_run(ref, xs[:1], ys[:1])[0].item()
    result["bf16_param_dtypes"] = sorted({str(p.to_local().dtype) for p in model.parameters()})
    result["bf16_buffer_dtypes"] = sorted({str(b.dtype) for b in model.buffers() if b.is_floating_point()})
    return result


@pytest.fixture(scope="module")
def fsdp_results() -> list[dict]:
    return run_distributed(_fsdp_run, world_size=2, timeout_s=300)


def test_fsdp_units_are_the_stages(fsdp_results):
    for r in fsdp_results:
        assert r["units"] == ["", "bn1", "conv1", "fc", "layer1", "layer2", "layer3", "layer4"]


def test_fsdp_matches_single_process_forward_backward(fsdp_results):
    for r in fsdp_results:
        for got, want in zip(r["eval_losses"], r["eval_ref_losses"]):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert r["eval_ref_losses"][-1] != r["eval_ref_losses"][0]
        assert r["eval_param_diff"] <= 1e-6
        assert r["features_diff"] <= 1e-5
        for got, want in zip(r["train_losses"], r["train_ref_losses"]):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert r["train_param_diff"] <= 1e-5  # parameters and BatchNorm running statistics


def test_fsdp_bf16_keeps_norms_in_fp32(fsdp_results):
    for r in fsdp_results:
        # norm: bf16 input, fp32 weight, bf16 output; the next convolution computes in bf16
        assert r["bf16_seen"] == {"norm": ["torch.bfloat16", "torch.float32", "torch.bfloat16"],
                                  "conv": ["torch.bfloat16"] * 3}
        assert r["bf16_param_dtypes"] == ["torch.float32"] and r["bf16_buffer_dtypes"] == ["torch.float32"]
        assert r["bf16_loss"] == pytest.approx(r["bf16_ref_loss"], rel=5e-2)
        assert r["bf16_loss"] != r["bf16_ref_loss"]


def test_distillation_run_exports_a_resnet_student(tmp_path):
    """The distill CLI end to end with a ResNet student (iBOT off): its EMA export carries BatchNorm statistics."""
    from pretrain.distill import main

    from .test_distill import TINY, make_teacher, overrides
    from .trainer_utils import write_shards

    urls = write_shards(tmp_path / "shards", n=16, per_shard=16)
    teacher = make_teacher(tmp_path / "teacher")
    sets = overrides(urls, teacher, **{"students": '[{name = "r", arch = "resnet_test"}]',
                                       "loss.ibot_weight": "0.0", "feature_weight": "1.0"})
    assert main([TINY, "--out", str(tmp_path / "run"), *[a for kv in sets for a in ("--set", kv)]]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(np.isfinite(m["r/dino"]) and m["r/feature"] > 0 for m in metrics)
    ema = build_backbone(None, weights=str(tmp_path / "run" / "export" / "r.pth")).eval()
    assert isinstance(ema, ResNet) and ema.cfg.width == 8
    assert ema.bn1.num_batches_tracked > 0 and ema.bn1.running_mean.abs().sum() > 0  # statistics followed
    with torch.inference_mode():
        assert ema(torch.randn(2, 3, 28, 28)).shape == (2, 64)
