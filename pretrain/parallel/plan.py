"""Dry-run the FSDP2 sharding plan at full scale on one CPU: a fake process group, a model on the meta device.

``plan_sharding`` builds the model without allocating it, joins a fake process group as one rank of a
``world_size`` job, applies ``parallelize`` exactly as training does and reports the FSDP units, what this rank
holds and a per-rank memory estimate. No collective runs, so a ViT-g student planned for 64 ranks takes seconds::

    python -m pretrain.parallel.plan pretrain/recipes/vitg14.toml --world-size 64
    python -m pretrain.parallel.plan --backbone vitl14 --world-size 16 --rank 15
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from pretrain.parallel.parallelize import DEFAULT_FP32_MODULES, parallelize

__all__ = ["ShardingPlan", "UnitPlan", "main", "plan_sharding"]

logger = logging.getLogger(__name__)

_ADAMW_BYTES = 16  # fp32 param + fp32 grad + two fp32 AdamW moments, per local element


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitPlan:
    """One FSDP unit (a block, a ResNet stage or its norms, a backbone root, a head)."""

    name: str
    """Qualified module name (``""`` for the model itself); ``a+b`` or ``a+N more`` for modules sharded together."""
    compute_dtype: str
    """Dtype the unit's parameters are gathered in for compute."""
    numel: int
    """Elements the unit manages (unsharded)."""
    local_numel: int
    """Elements this rank stores for the unit."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardingPlan:
    """What one rank holds under the plan."""

    world_size: int
    """Ranks in the planned job."""
    rank: int
    """The rank described."""
    units: list[UnitPlan]
    """FSDP units in module order."""

    @property
    def numel(self) -> int:
        """All parameters of the model."""
        return sum(u.numel for u in self.units)

    @property
    def local_numel(self) -> int:
        """Parameter elements stored on this rank."""
        return sum(u.local_numel for u in self.units)

    def train_state_bytes(self) -> int:
        """Sharded training state on this rank: fp32 params, grads and AdamW moments (16 B per local element)."""
        return _ADAMW_BYTES * self.local_numel

    def gathered_bytes(self) -> int:
        """Peak gathered parameters: the two largest units in compute dtype (the current and the prefetched)."""
        sizes = sorted((u.numel * torch.empty(0, dtype=getattr(torch, u.compute_dtype)).element_size()
                        for u in self.units), reverse=True)
        return sum(sizes[:2])

    def summary(self) -> str:
        """A readable table: units (consecutive equal blocks collapsed) and the per-rank estimate."""
        lines = [f"rank {self.rank} of {self.world_size}: {self.local_numel / 1e6:.2f}M of "
                 f"{self.numel / 1e6:.2f}M parameters"]
        i = 0
        while i < len(self.units):
            u, j = self.units[i], i + 1
            while (j < len(self.units) and self.units[j].numel == u.numel and
                   self.units[j].compute_dtype == u.compute_dtype and
                   self.units[j].name.rsplit(".", 1)[0] == u.name.rsplit(".", 1)[0] != u.name):
                j += 1
            label = u.name or "<model>"
            if j - i > 1:
                parent, first = u.name.rsplit(".", 1)
                label = f"{parent}.[{first}-{self.units[j - 1].name.rsplit('.', 1)[1]}]"
            count = f"{j - i} x " if j - i > 1 else ""
            lines.append(f"  {label:<40} {count}{u.numel / 1e6:9.3f}M  local {u.local_numel / 1e6:9.3f}M  "
                         f"{u.compute_dtype}")
            i = j
        lines.append(f"  sharded train state (fp32 params+grads+AdamW): {self.train_state_bytes() / 2**30:.2f} GiB")
        lines.append(f"  gathered parameters at peak (2 units): {self.gathered_bytes() / 2**30:.2f} GiB "
                     "(activations not included)")
        return "\n".join(lines)


def _units(model: nn.Module) -> list[UnitPlan]:
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    groups: dict[int, list[tuple[str, nn.Module]]] = {}  # modules sharded together (a list) share one state
    for name, module in fsdp_modules:
        groups.setdefault(id(module._get_fsdp_state()), []).append((name, module))
    owned: set[int] = set()
    units = []
    for _, module in reversed(fsdp_modules):  # innermost first: a parent unit manages what is left
        members = groups.pop(id(module._get_fsdp_state()), None)
        if members is None:  # a group already counted at its last member
            continue
        names = [n for n, _ in members]
        name = "+".join(names) if len(names) <= 2 else f"{names[0]}+{len(names) - 1} more"
        params = [p for _, m in members for p in m.parameters() if id(p) not in owned]
        params = list({id(p): p for p in params}.values())
        owned.update(id(p) for p in params)
        policy = module._get_fsdp_state()._mp_policy  # the policy FSDP applies to this unit
        dtype = policy.param_dtype or (params[0].dtype if params else torch.float32)
        units.append(UnitPlan(name=name, compute_dtype=str(dtype).removeprefix("torch."),
                              numel=sum(p.numel() for p in params),
                              local_numel=sum(p.to_local().numel() for p in params)))
    return units[::-1]


def plan_sharding(
    build: Callable[[], nn.Module],
    *,
    world_size: int,
    rank: int = 0,
    mp_policy: str = "bf16",
    fp32_modules: Sequence[str] = DEFAULT_FP32_MODULES,
) -> ShardingPlan:
    """Build ``build()`` on the meta device and shard it as rank ``rank`` of ``world_size`` (fake process group).

    Must run in a process without a real process group (it creates and destroys a fake one).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    if dist.is_initialized():
        raise RuntimeError("plan_sharding needs a process without a process group (it creates a fake one)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        with torch.device("meta"):
            model = build()
        mesh = init_device_mesh("cpu", (world_size,))
        parallelize(model, mesh=mesh, mp_policy=mp_policy, fp32_modules=fp32_modules)
        return ShardingPlan(world_size=world_size, rank=rank, units=_units(model))
    finally:
        dist.destroy_process_group()


def _recipe_student(recipe: str, overrides: Sequence[str]) -> Callable[[], nn.Module]:
    from pretrain.ssl.meta_arch import SSLMetaArch
    from pretrain.train import TrainConfig
    from pretrain.utils.config import load_config

    cfg = load_config(TrainConfig, recipe, list(overrides))
    backbone = dataclasses.replace(cfg.backbone, weights=None)  # shapes only: nothing is loaded on meta
    return lambda: SSLMetaArch(backbone, cfg.heads, cfg.loss).student


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the sharding plan of a recipe's student (or of a bare backbone) for one rank."""
    parser = argparse.ArgumentParser(prog="python -m pretrain.parallel.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", help="TOML recipe: plan its student (backbone + heads)")
    parser.add_argument("--backbone", help="plan a bare backbone by name instead of a recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, repeatable")
    parser.add_argument("--world-size", type=int, required=True, help="ranks in the planned job")
    parser.add_argument("--rank", type=int, default=0, help="the rank to describe (default 0)")
    parser.add_argument("--mp-policy", choices=("bf16", "fp32"), default="bf16", help="backbone precision")
    args = parser.parse_args(argv)
    if (args.recipe is None) == (args.backbone is None):
        parser.error("give either a RECIPE or --backbone NAME")
    if args.backbone is not None:
        from pretrain.models import build_backbone

        name = args.backbone

        def build() -> nn.Module:
            return build_backbone(name)
    else:
        build = _recipe_student(args.recipe, args.overrides)
    try:
        plan = plan_sharding(build, world_size=args.world_size, rank=args.rank, mp_policy=args.mp_policy)
    except ValueError as exc:
        parser.error(str(exc))
    print(plan.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
