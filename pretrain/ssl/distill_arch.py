"""DINOv2 distillation meta-architecture: one frozen teacher, one or more students, an EMA of each student.

The recipe of the DINOv2 paper (section 5 / appendix): the pretraining objective and loop, but the teacher is a
larger pretrained model that stays frozen (backbone *and* its DINO/iBOT heads, eval mode, no gradients); the
students use no masking and no stochastic depth; the iBOT loss covers *every* patch token of the two global crops
(the mask is all True); and a spare EMA of each student is kept - that EMA is the deliverable.

Several students share one batch and one teacher forward (as DINOv3's multi-distillation): each has its own
backbone, heads, EMA and optimizer parameter groups, and the total loss is the sum of the students' losses, so
their gradients never mix. Students' heads copy the teacher's head dimensions (the prototypes must match for the
cross-entropies) and start fresh. No parallelism lives here: ``pretrain.distill`` shards the teacher, every
student and every EMA with ``pretrain.parallel.parallelize``.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import re
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from torch import nn

from pretrain.losses import SoftmaxCenter, dino_loss, ibot_loss, koleo_loss
from pretrain.models import backbone_names, build_backbone
from pretrain.models.heads import HeadsConfig, build_heads
from pretrain.parallel.ema import ema_buffers_, ema_update_
from pretrain.ssl.meta_arch import LossConfig, head_logits, teacher_targets_from_logits

logger = logging.getLogger(__name__)

__all__ = ["DistillMetaArch", "StudentConfig", "TeacherConfig", "load_teacher_heads"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MLP_LINEAR = re.compile(r"^mlp\.(\d+)\.weight$")


@dataclasses.dataclass(kw_only=True)
class TeacherConfig:
    """The frozen teacher: a backbone checkpoint plus its DINO/iBOT heads."""

    weights: str
    """Backbone weights: a dinoforge ``export/teacher.pth`` (with its ``.json`` sidecar), an official DINOv2
    backbone file (set ``name``), or a DINOv2 ``teacher_checkpoint.pth``. Local path or fsspec URL."""
    heads: str | None = None
    """Heads file: a dinoforge ``teacher_heads.pth`` or a DINOv2 ``teacher_checkpoint.pth`` (``dino_head.*`` /
    ``ibot_head.*`` keys). None: ``teacher_heads.pth`` beside ``weights``. Required: distillation targets are the
    teacher's head outputs, and the official DINOv2 releases ship no heads."""
    name: str | None = None
    """Architecture (an entry of ``pretrain.models.backbone_names()``); None reads it from the weights' sidecar."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Other ``ViTConfig`` fields of the teacher (e.g. ``{patch_size = 7}`` for a checkpoint without sidecar)."""

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise ValueError("teacher.weights must name the teacher backbone checkpoint")
        if self.name is not None and self.name not in backbone_names():
            raise ValueError(f"teacher.name {self.name!r} is unknown; known: {', '.join(backbone_names())}")
        if "drop_path_rate" in self.overrides:
            raise ValueError("teacher.overrides.drop_path_rate: the frozen teacher never drops paths; remove it")

    @property
    def heads_path(self) -> str:
        if self.heads is not None:
            return self.heads
        return self.weights.rsplit("/", 1)[0] + "/teacher_heads.pth" if "/" in self.weights else "teacher_heads.pth"


@dataclasses.dataclass(kw_only=True)
class StudentConfig:
    """One student of the run (no masking, no drop-path; its EMA is exported as ``export/<name>.pth``)."""

    name: str
    """Unique id of the student: metric prefix and export file name (letters, digits, ``_.-``)."""
    arch: str
    """Architecture, an entry of ``pretrain.models.backbone_names()`` (e.g. ``vits14``, ``vit_test``)."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Other ``ViTConfig`` fields, e.g. ``{patch_size = 7, img_size = 28}``; the patch size must be the teacher's."""
    weights: str | None = None
    """Optional initial backbone weights (random init otherwise, as in DINOv2)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"students.name {self.name!r} must be letters, digits, '_', '.' or '-'")
        if self.arch not in backbone_names():
            raise ValueError(f"students.arch {self.arch!r} (student {self.name}) is unknown; known: "
                             f"{', '.join(backbone_names())}")
        if "drop_path_rate" in self.overrides:
            raise ValueError(f"students.overrides.drop_path_rate (student {self.name}): distillation students use "
                             "no stochastic depth; remove it")


# ----------------------------------------------------------------------------------------------------- heads
def _load(path: str) -> Any:
    try:
        with fsspec.open(path, "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(
            f"teacher.heads: {path} does not exist. Distillation needs the teacher's DINO/iBOT heads: pass "
            "teacher.heads=<teacher_heads.pth of a dinoforge run, or a DINOv2 teacher_checkpoint.pth> "
            "(official DINOv2 backbone releases ship no heads)"
        ) from None


def _infer_head(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, int]:
    """in_dim, out_dim, hidden_dim, bottleneck_dim and nlayers of one head from its weight shapes."""
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    linears = sorted(int(m.group(1)) for k in sub if (m := _MLP_LINEAR.match(k)))
    if not linears or "last_layer.weight_v" not in sub:
        raise ValueError(f"heads file has no complete {prefix[:-1]} (need mlp.*.weight and last_layer.weight_v)")
    first = sub[f"mlp.{linears[0]}.weight"]
    out_dim, bottleneck = sub["last_layer.weight_v"].shape
    return {"in_dim": int(first.shape[1]), "out_dim": int(out_dim), "bottleneck_dim": int(bottleneck),
            "hidden_dim": int(first.shape[0]) if len(linears) > 1 else 2048, "nlayers": len(linears)}


def load_teacher_heads(path: str) -> tuple[dict[str, torch.Tensor], HeadsConfig, dict[str, torch.Tensor], int]:
    """Read a heads file: ``(state dict with dino_head.* / ibot_head.* keys, HeadsConfig, centers, in_dim)``.

    Accepts a dinoforge ``teacher_heads.pth`` (``{"heads", "centers", "heads_config"}``) or a DINOv2 training
    ``teacher_checkpoint.pth`` (``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``). The head
    dimensions are read from the weight shapes.
    """
    obj = _load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"teacher.heads: {path} does not hold a dict")
    centers: dict[str, torch.Tensor] = {}
    if "heads" in obj:
        sd, centers = dict(obj["heads"]), dict(obj.get("centers") or {})
    else:
        for wrapper in ("teacher", "model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
        sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    sd = {k: v for k, v in sd.items() if k.startswith(("dino_head.", "ibot_head."))}
    if not sd:
        raise ValueError(f"teacher.heads: {path} holds no dino_head.* weights")
    dino = _infer_head(sd, "dino_head.")
    cfg = HeadsConfig(out_dim=dino["out_dim"], hidden_dim=dino["hidden_dim"], bottleneck_dim=dino["bottleneck_dim"],
                      nlayers=dino["nlayers"])
    if any(k.startswith("ibot_head.") for k in sd):
        ibot = _infer_head(sd, "ibot_head.")
        if ibot["nlayers"] != dino["nlayers"]:
            raise ValueError(f"teacher.heads: {path}: dino_head and ibot_head have different MLP depths")
        cfg = dataclasses.replace(cfg, separate_ibot_head=True, ibot_out_dim=ibot["out_dim"],
                                  ibot_hidden_dim=ibot["hidden_dim"], ibot_bottleneck_dim=ibot["bottleneck_dim"])
    return sd, cfg, centers, dino["in_dim"]


# ----------------------------------------------------------------------------------------------------- arch
class DistillMetaArch(nn.Module):
    """``teacher`` (frozen ModuleDict: backbone + heads), ``students`` and ``emas`` (ModuleDicts keyed by name)."""

    def __init__(self, teacher: TeacherConfig, students: list[StudentConfig], loss: LossConfig, *,
                 feature_weight: float = 0.0) -> None:
        super().__init__()
        if feature_weight < 0:
            raise ValueError(f"feature_weight must be >= 0, got {feature_weight}")
        self.feature_weight = feature_weight
        if not students:
            raise ValueError("students: give at least one student")
        names = [s.name for s in students]
        if len(set(names)) != len(names):
            raise ValueError(f"students.name must be unique, got {names}")
        self.loss_cfg = loss
        fs, path = fsspec.core.url_to_fs(teacher.weights)
        if not fs.exists(path):
            raise ValueError(f"teacher.weights: {teacher.weights} does not exist; set it to the teacher backbone "
                             "(e.g. --set teacher.weights=runs/<teacher>/export/teacher.pth)")
        backbone = build_backbone(teacher.name, weights=teacher.weights, drop_path_rate=0.0, **teacher.overrides)
        heads_sd, self.heads_cfg, centers, in_dim = load_teacher_heads(teacher.heads_path)
        if in_dim != backbone.embed_dim:
            raise ValueError(f"teacher.heads take {in_dim}-d inputs but the teacher backbone is "
                             f"{backbone.embed_dim}-d: the heads belong to another model")
        self.teacher = nn.ModuleDict({"backbone": backbone, **build_heads(self.heads_cfg, backbone.embed_dim)})
        missing, unexpected = self.teacher.load_state_dict(heads_sd, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"teacher.heads do not match: missing {missing}, unexpected {unexpected}")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.patch_size = backbone.patch_size

        nets = {}
        for s in students:
            net = build_backbone(s.arch, weights=s.weights, drop_path_rate=0.0, **s.overrides)
            if self.use_ibot and net.patch_size != self.patch_size:
                raise ValueError(f"students.overrides.patch_size of {s.name} is {net.patch_size} but the teacher's "
                                 f"is {self.patch_size}: iBOT on all patches needs the same patch grid (or set "
                                 "loss.ibot_weight = 0, as ResNet students need)")
            nets[s.name] = nn.ModuleDict({"backbone": net, **build_heads(self.heads_cfg, net.embed_dim)})
            if feature_weight > 0:  # linear map of the student's CLS into the teacher's feature space
                nets[s.name]["feature_head"] = nn.Linear(net.embed_dim, backbone.embed_dim)
        self.students = nn.ModuleDict(nets)
        self.emas = copy.deepcopy(self.students)  # the spare EMA of each student: the deliverable
        self.emas.requires_grad_(False)
        self.student_archs = {s.name: s.arch for s in students}

        self.dino_center = SoftmaxCenter(self.heads_cfg.out_dim, loss.center_momentum)
        ibot_dim = self.heads_cfg.ibot_out_dim if self.heads_cfg.separate_ibot_head else self.heads_cfg.out_dim
        self.ibot_center = SoftmaxCenter(ibot_dim, loss.center_momentum)
        for key, center in (("dino_center", self.dino_center), ("ibot_center", self.ibot_center)):
            value = centers.get(key)
            if value is not None and tuple(value.shape) == tuple(center.center.shape):
                center.center.copy_(value)  # continue the teacher run's centering

    def train(self, mode: bool = True) -> DistillMetaArch:
        super().train(mode)
        self.teacher.eval()  # frozen, inference behaviour
        self.emas.eval()
        return self

    @property
    def use_ibot(self) -> bool:
        return self.loss_cfg.ibot_weight > 0

    def checkpoint_modules(self) -> nn.ModuleDict:
        """What a checkpoint holds: students, EMAs and centers (the frozen teacher is reloaded from its file)."""
        return nn.ModuleDict({"students": self.students, "emas": self.emas, "dino_center": self.dino_center,
                              "ibot_center": self.ibot_center})

    @torch.no_grad()
    def teacher_targets(self, global_crops: torch.Tensor, temp: float) -> dict[str, torch.Tensor | None]:
        """Frozen-teacher CLS targets (2B, K) and, with iBOT, targets for all (2B * N, K) global-crop patches."""
        out = self.teacher["backbone"].forward_features(global_crops)
        patches = out["x_norm_patchtokens"].flatten(0, 1) if self.use_ibot else None
        cls_logits, patch_logits = head_logits(self.teacher, out["x_norm_clstoken"], patches)
        dino_probs = teacher_targets_from_logits(cls_logits, self.loss_cfg, self.dino_center, temp)
        ibot_probs = None
        if patch_logits is not None:
            ibot_probs = teacher_targets_from_logits(patch_logits, self.loss_cfg, self.ibot_center, temp)
        return {"cls_logits": cls_logits, "dino_probs": dino_probs, "ibot_probs": ibot_probs,
                "n_patches": out["x_norm_patchtokens"].shape[1], "cls": out["x_norm_clstoken"]}

    def compute_losses(self, batch: dict[str, Any], teacher_temp: float) -> tuple[torch.Tensor, dict[str, Any]]:
        """Sum of the students' losses and every part (``<student>/dino``, ...), from a collated multi-crop batch.

        Uses ``global_crops`` (2B, 3, H, W) and ``local_crops`` (nB, 3, h, w), crop-major; any ``masks`` in the
        batch are ignored (students see unmasked crops and iBOT covers every patch).
        """
        cfg = self.loss_cfg
        g = batch["global_crops"]
        loc = batch.get("local_crops")
        n_global = g.shape[0]
        teacher = self.teacher_targets(g, teacher_temp)
        crops = [g] if loc is None or loc.shape[0] == 0 else [g, loc]
        all_patches = torch.ones(n_global, teacher["n_patches"], dtype=torch.bool, device=g.device)

        parts: dict[str, Any] = {}
        total = g.new_zeros((), dtype=torch.float32)
        per_student: dict[str, dict[str, torch.Tensor]] = {}
        for name, net in self.students.items():
            outs = net["backbone"].forward_features_list(crops)
            s_cls = torch.cat([o["x_norm_clstoken"] for o in outs])  # view-major: globals then locals
            s_patches = outs[0]["x_norm_patchtokens"].flatten(0, 1) if self.use_ibot else None
            s_cls_logits, s_patch_logits = head_logits(net, s_cls, s_patches)
            loss = s_cls.new_zeros((), dtype=torch.float32)
            if cfg.dino_weight > 0:
                n_views = s_cls.shape[0] // (n_global // 2)
                parts[f"{name}/dino"] = dino_loss(s_cls_logits, teacher["dino_probs"], cfg.student_temp,
                                                  n_teacher_views=2, n_student_views=n_views)
                loss = loss + cfg.dino_weight * parts[f"{name}/dino"]
            if self.use_ibot:
                parts[f"{name}/ibot"] = ibot_loss(s_patch_logits, teacher["ibot_probs"], all_patches,
                                                  cfg.student_temp)
                loss = loss + cfg.ibot_weight * parts[f"{name}/ibot"]
            if cfg.koleo_weight > 0:
                g_cls = outs[0]["x_norm_clstoken"]
                parts[f"{name}/koleo"] = sum(koleo_loss(c, distributed=cfg.koleo_distributed) for c in g_cls.chunk(2))
                loss = loss + cfg.koleo_weight * parts[f"{name}/koleo"]
            if self.feature_weight > 0:  # same crop: 1 - cos(W s_cls, t_cls) over the global crops
                mapped = net["feature_head"](outs[0]["x_norm_clstoken"]).float()
                cos = torch.nn.functional.cosine_similarity(mapped, teacher["cls"].float(), dim=-1)
                parts[f"{name}/feature"] = (1.0 - cos).mean()
                loss = loss + self.feature_weight * parts[f"{name}/feature"]
            parts[f"{name}/total"] = loss
            total = total + loss
            per_student[name] = {"cls_logits": s_cls_logits[:n_global], "cls": outs[0]["x_norm_clstoken"]}
        parts["total"] = total
        extras = {"teacher_probs": teacher["dino_probs"], "teacher_cls_logits": teacher["cls_logits"],
                  "students": per_student}
        return total, {"losses": {k: v.detach() for k, v in parts.items()}, "extras": extras}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """The loop's EMA step: ``ema <- m * ema + (1 - m) * student`` for every student (the teacher is frozen)."""
        for name, student in self.students.items():
            ema_update_(self.emas[name].parameters(), student.parameters(), momentum)
            ema_buffers_(self.emas[name], student, momentum)  # BatchNorm statistics of ResNet students
