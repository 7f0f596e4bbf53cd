"""The steps of every stage, planned from the recipe's settings the way the stages plan their parts.

Task counts follow the code: manifest parts of ``ingest.rows_per_part`` rows, dedupe blocks of ``block_rows``
vectors, the exact plan's tile pairs or the IVF plan's ``n x replicas / list_rows`` lists (the choice by
:func:`curation.index.config.plan_index`), verification tasks of ``verify_task_pairs`` pairs, component rounds,
the k-means levels, the balanced sample's quota rounds, shard groups and shards. Costs are the table's per-unit
figures times the units of work: images, candidate pairs, scored vector pairs (``a + b x dim`` seconds each),
dot products of k-means and of nearest-centroid search. The constants mirrored from the stage modules
(``_IVF_MIN_PER_LIST``, ``_CELLS``, ``_MAX_BINS``, ``_FINE_PER_GROUP``, ``_MAX_FINE``) are checked against them by
``tests/curation/test_plan.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from curation.config import RunConfig
from curation.index.config import plan_index
from curation.plan.model import Assumptions, Step
from curation.plan.nodes import Cluster
from curation.plan.table import ThroughputTable

__all__ = ["MODEL_DIMS", "MODEL_PARAMS_M", "Flow", "STAGE_STEPS", "embed_model", "flow_of"]

#: Output dimension of every embed model the table knows (the torchscript model is planned as SSCD).
MODEL_DIMS = {"descriptor": 5632, "sscd": 512, "vits14": 384, "vitb14": 768, "vitl14": 1024, "vitg14": 1536}
#: Parameters (millions): fp32 weights held by an embed actor.
MODEL_PARAMS_M = {"descriptor": 0.0, "sscd": 24.6, "vits14": 22.1, "vitb14": 86.6, "vitl14": 304.4, "vitg14": 1136.5}
#: Python objects of one row held as a dict (``Table.from_pylist``): order of magnitude, for memory.
_PY_ROW_BYTES = 1024
_IVF_MIN_PER_LIST = 39  # copygraph.ivf_lists: at most one list per 39 vectors
_CELLS, _MAX_BINS = 1 << 22, 256  # quota.CELLS, quota.MAX_BINS
_FINE_PER_GROUP, _MAX_FINE = 4, 1 << 20  # shard_plan.FINE_PER_GROUP, shard_plan.MAX_FINE
_MB = 1 << 20


def embed_model(cfg: RunConfig) -> str:
    """The table's name for the recipe's embed model."""
    e = cfg.embed
    if e.model == "descriptor":
        return "descriptor"
    if e.model == "torchscript":
        return "sscd"
    if e.model == "backbone":
        name = re.sub(r"_reg\d+$", "", e.name)
        if name not in MODEL_DIMS:
            raise ValueError(f"embed.name={e.name!r}: the plan knows {', '.join(MODEL_DIMS)}")
        return name
    raise ValueError('embed.model = "plugin": the plan has no figures for a plugin embedder; plan with '
                     '--set embed.model=... naming the model it wraps')  # fmt: skip


@dataclass(kw_only=True)
class Flow:
    """Images at each point of the run, the parts they are in and the embedding dimension."""

    files: float
    unique: float
    parts: int
    dim: int
    kept: float
    balanced: float
    selected: float
    model: str


def _ceil(x: float) -> int:
    return max(1, math.ceil(x))


def flow_of(cfg: RunConfig, images: int, a: Assumptions) -> Flow:
    """The funnel under the assumptions: unique images, kept, balanced sample, selection."""
    model = embed_model(cfg)
    unique = images * a.unique_fraction
    kept = unique * a.keep_fraction
    balanced = min(kept, cfg.cluster.target_size) if "cluster" in cfg.stages and cfg.cluster.target_size else 0.0
    retrieved = sum(a.seed_images / max(1, len(cfg.retrieve.seeds)) * s.n_per_seed for s in cfg.retrieve.seeds)
    if "retrieve" in cfg.stages:
        selected = min(kept, retrieved + (balanced if cfg.retrieve.include_balanced else 0.0))
    else:
        selected = balanced or kept
    return Flow(files=images, unique=unique, parts=_ceil(unique / cfg.ingest.rows_per_part),
                dim=MODEL_DIMS[model], kept=kept, balanced=balanced, selected=selected, model=model)  # fmt: skip


def _pair_s(t: ThroughputTable, pairs: float, dim: int) -> float:
    """CPU-seconds to score ``pairs`` vector pairs of ``dim`` (blockjoin: product, threshold, top-k)."""
    return pairs * (t.value("dedupe.join_s_per_pair") + dim * t.value("dedupe.join_s_per_pair_dim"))


def ingest(cfg: RunConfig, f: Flow, t: ThroughputTable, a: Assumptions, c: Cluster) -> list[Step]:
    i = cfg.ingest
    per_task = math.ceil(f.parts / min(f.parts, i.collapse_tasks))
    rss = t.value("rss.ingest")
    scan = _ceil(f.files / i.files_per_part)
    return [
        Step(name="scan", tasks=scan, cpu_s=f.files * t.value("ingest.scan_s_per_file"),
             rss_mb=rss + i.files_per_part * _PY_ROW_BYTES / _MB, scratch=f.files * t.value("bytes.occurrences")),
        Step(name="collapse", tasks=math.ceil(f.parts / per_task), reads=math.ceil(f.parts / per_task) * scan,
             cpu_s=f.files * t.value("ingest.collapse_s_per_row"),
             rss_mb=rss + per_task * i.rows_per_part * _PY_ROW_BYTES / _MB,
             written=f.unique * t.value("bytes.manifest") + f.files * t.value("bytes.occurrences")),
    ]  # fmt: skip


def _embed_pool(cfg: RunConfig, f: Flow, c: Cluster) -> tuple[bool, int]:
    """``(on GPU, actors)`` as :meth:`curation.stages.embed.EmbedStage.pool` decides them."""
    e = cfg.embed
    gpus = c.gpus if e.device == "auto" else 0
    if f.model != "descriptor" and (gpus or e.device == "cuda"):
        if not c.gpus:
            raise ValueError('embed.device = "cuda" but the planned cluster has no GPUs: give --gpus-per-node '
                             '(or --cluster) or plan with --set embed.device="auto"')  # fmt: skip
        return True, e.num_actors or max(1, gpus)
    return False, e.num_actors or max(1, c.cpus // e.cpus_per_actor)


def embed(cfg: RunConfig, f: Flow, t: ThroughputTable, a: Assumptions, c: Cluster) -> list[Step]:
    e = cfg.embed
    gpu, actors = _embed_pool(cfg, f, c)
    held = (MODEL_PARAMS_M[f.model] * 4e6 + e.batch_size * 3 * e.image_size**2 * 4
            + cfg.ingest.rows_per_part * f.dim * 4) / _MB  # fmt: skip
    value_bytes = (2 if e.dtype == "float16" else 4) * t.value("bytes.embedding_value_ratio")
    step = Step(name="embed", tasks=f.parts, threads=e.cpus_per_actor, cpus_per_task=e.cpus_per_actor,
                max_slots=min(actors, f.parts), start_s=t.value("ray.actor_start_s"),
                rss_mb=t.value("rss.embed") + held,
                written=f.unique * (f.dim * value_bytes + t.value("bytes.embedding_row")))  # fmt: skip
    if gpu:
        step.gpus_per_task = 1.0
        step.gpu_s = f.unique / t.value(f"embed.gpu.{f.model}")
        step.cpu_s = f.unique * t.value("embed.cpu.decode_s_per_image")
    else:
        step.cpu_s = f.unique * t.value(f"embed.cpu.{f.model}")
    return [step]


def _blocks(f: Flow, rows_per_part: int, max_rows: int) -> int:
    """Blocks of consecutive equal parts of at most ``max_rows`` rows (``copygraph.plan_blocks``)."""
    per_block = max(1, max_rows // max(1, rows_per_part))
    return _ceil(f.parts / per_block)


def dedupe(cfg: RunConfig, f: Flow, t: ThroughputTable, a: Assumptions, c: Cluster) -> list[Step]:
    d, n, dim = cfg.dedupe, f.unique, f.dim
    rows = cfg.ingest.rows_per_part
    blocks = _blocks(f, rows, d.block_rows)
    base = t.value("rss.dedupe")
    block_mb = d.block_rows * (dim * 4 * 2 + d.k * 24) / _MB
    edge_k = d.max_candidates if d.verify else d.k
    # the driver reads every embedding part's footer (row counts) and lists the manifest
    steps: list[Step] = [Step(name="driver: part footers", tasks=1, max_slots=1, reads=2 * f.parts)]
    if plan_index(max(1, int(n)), dim, d.index).kind == "flat":
        tiles = _blocks(f, rows, max(1, d.block_rows // 8))
        tile_rows = min(n, max(1, d.block_rows // 8 // rows) * rows)
        n_join = tiles * (tiles + 1) // 2
        steps.append(Step(name="join (exact)", tasks=n_join, cpu_s=_pair_s(t, n * n / 2, dim), reads=2 * n_join,
                          rss_mb=base + 2 * tile_rows * dim * 4 / _MB, scratch=n * edge_k * 24))  # fmt: skip
    else:
        nlist = max(1, min(int(n) // _IVF_MIN_PER_LIST, round(n * d.replicas / d.list_rows)))
        n_train = min(n, max(nlist * d.index.train_points_per_list, nlist * d.index.min_points_per_list))
        kdot, sdot = t.value("dedupe.kmeans_s_per_dot"), t.value("dedupe.search_s_per_dot")
        r = min(d.replicas, nlist)
        list_len = n * r / nlist
        steps += [
            Step(name="train (IVF lists)", tasks=1, threads=d.index.threads or 1,
                 cpu_s=n_train * nlist * dim * (d.index.train_niter * kdot + sdot),
                 rss_mb=base + (n_train + nlist) * dim * 4 / _MB),
            Step(name="bucket", tasks=f.parts, threads=d.index.threads or 1, cpu_s=n * nlist * dim * sdot,
                 rss_mb=base + (rows * r * (dim * 6 + 40) + nlist * dim * 4) / _MB, scratch=n * r * (dim * 2 + 60)),
        ]  # fmt: skip
        n_join = max(1, min(nlist, math.ceil(n * r / d.block_rows)))  # lists packed into ~block_rows groups
        join_mb = max(d.block_rows, list_len) * (dim * 4 * 2 + d.k * 24) / _MB
        steps.append(Step(name="join (IVF)", tasks=n_join, cpu_s=_pair_s(t, nlist * list_len**2 / 2, dim),
                          reads=n_join * f.parts, rss_mb=base + join_mb, scratch=n * edge_k * 24))  # fmt: skip
    if d.verify:
        cand = n * min(d.max_candidates, a.candidates_per_image)
        split = _ceil(cand / (d.verify_task_pairs * blocks))
        steps += [
            Step(name="features", tasks=blocks * split, rss_mb=t.value("rss.verify"),
                 cpu_s=n * a.features_fraction * t.value("dedupe.features_s_per_image"),
                 scratch=n * a.features_fraction * t.value("bytes.features")),
            Step(name="verify", tasks=blocks * split, cpu_s=cand * t.value("dedupe.verify_s_per_candidate"),
                 rss_mb=t.value("rss.verify"), written=cand * t.value("bytes.verify_pair")),
        ]  # fmt: skip
    if d.recall_sample:
        sample = min(d.recall_sample, n)
        steps.append(Step(name="recall", tasks=blocks, cpu_s=_pair_s(t, sample * n, dim), calls=2,
                          rss_mb=base + block_mb))  # fmt: skip
    # reduce, locate (verify), component rounds and labels, keep/resolve/write, the largest components (3 maps)
    calls = 1 + int(d.verify) + math.ceil(a.cc_rounds) + 1 + 3 + 3
    shuffles = (math.ceil(a.cc_rounds) + 1 + 3) * blocks * blocks + blocks * n_join  # reduce reads every join
    steps.append(Step(name="reduce, components, keep, write", tasks=blocks, calls=calls, reads=shuffles,
                      cpu_s=n * t.value("dedupe.other_s_per_image"), rss_mb=base + block_mb,
                      written=n * t.value("bytes.dedup")))  # fmt: skip
    return steps


def _kmeans_dots(n_in: float, levels: list, dim: int) -> float:
    """Dot products of hierarchical k-means (``index.hkmeans``): per level the k-means on its subsample, the
    resampling steps (assignment + k-means on the closest points) and the final assignment."""
    dots = 0.0
    for lvl in levels:
        k = lvl.n_clusters
        fit = min(n_in, lvl.max_points_per_centroid * k) * lvl.niter * lvl.nredo
        resample = lvl.n_resampling_steps * (n_in + min(n_in, k * lvl.sample_size) * lvl.niter * lvl.nredo)
        dots += k * dim * (fit + resample + n_in)
        n_in = k
    return dots


def cluster(cfg: RunConfig, f: Flow, t: ThroughputTable, a: Assumptions, c: Cluster) -> list[Step]:
    cl, dim, kept = cfg.cluster, f.dim, f.kept
    first = cl.levels[0]
    n_train = min(kept, cl.train_points or first.max_points_per_centroid * first.n_clusters)
    base = t.value("rss.cluster")
    threads = min(cl.train_cpus, max(g.cpus for g in c.groups))
    steps = [
        Step(name="train (k-means)", tasks=1, threads=threads, cpus_per_task=threads, reads=2 * f.parts,
             cpu_s=_kmeans_dots(n_train, cl.levels, dim) * t.value("dedupe.kmeans_s_per_dot"),
             rss_mb=base + (n_train + first.n_clusters) * dim * 4 / _MB),
        Step(name="assign", tasks=f.parts, cpu_s=kept * first.n_clusters * dim * t.value("dedupe.search_s_per_dot")
             + kept * t.value("cluster.other_s_per_image"), calls=2,
             rss_mb=base + (cfg.ingest.rows_per_part * dim * 4 * 2 + first.n_clusters * dim * 4) / _MB,
             written=kept * t.value("bytes.assign") + first.n_clusters * dim * 4),
    ]  # fmt: skip
    if cl.target_size:
        rounds = 0
        if cl.target_size < kept:
            bins = max(2, min(_MAX_BINS, _CELLS // first.n_clusters))
            rounds = 1 + math.ceil(math.log(max(2.0, kept / first.n_clusters)) / math.log(bins))
        steps.append(Step(name="balance, pick, balanced", tasks=f.parts, calls=rounds + 2, rss_mb=base,
                          written=f.balanced * t.value("bytes.selection")))  # fmt: skip
    return steps


def retrieve(cfg: RunConfig, f: Flow, t: ThroughputTable, a: Assumptions, c: Cluster) -> list[Step]:
    r, dim = cfg.retrieve, f.dim
    buckets = _ceil(f.selected / r.rows_per_part)
    steps = [Step(name="driver: kept counts", tasks=1, max_slots=1, reads=f.parts)]
    if r.seeds and a.seed_images:
        seed_s = t.value("ingest.scan_s_per_file") + t.value("ingest.collapse_s_per_row")
        seed_s += t.value("embed.cpu.decode_s_per_image") if c.gpus and f.model != "descriptor" \
            else t.value(f"embed.cpu.{f.model}")
        steps += [
            Step(name="seed sets: ingest, embed", tasks=_ceil(a.seed_images / cfg.ingest.rows_per_part),
                 cpu_s=a.seed_images * seed_s, calls=3 * len(r.seeds), rss_mb=t.value("rss.embed")),
            Step(name="search, merge", tasks=f.parts, calls=2 * len(r.seeds),
                 cpu_s=f.kept * a.seed_images * dim * t.value("dedupe.search_s_per_dot"),
                 rss_mb=t.value("rss.retrieve") + (a.seed_images * dim * 4) / _MB),
        ]  # fmt: skip
    steps.append(Step(name="select", tasks=buckets, cpu_s=f.selected * t.value("retrieve.select_s_per_row"),
                      rss_mb=t.value("rss.retrieve") + min(f.selected, r.rows_per_part) * 200 / _MB,
                      written=f.selected * t.value("bytes.selection")))  # fmt: skip
    return steps


def shard(cfg: RunConfig, f: Flow, t: ThroughputTable, a: Assumptions, c: Cluster) -> list[Step]:
    s, sel = cfg.shard, f.selected
    groups = _ceil(sel / s.group_rows)
    fine = min(_MAX_FINE, _ceil(_FINE_PER_GROUP * f.unique / s.group_rows))
    n_shards = _ceil(sel / s.samples_per_shard)
    if s.max_shard_bytes:
        n_shards = max(n_shards, _ceil(sel * a.image_bytes / s.max_shard_bytes))
    base = t.value("rss.shard")
    batches = groups + _ceil(f.unique / s.group_rows)
    return [
        Step(name="driver: part footers", tasks=1, max_slots=1, reads=f.parts + groups),
        Step(name="select, lineage, join, plan", tasks=max(groups, fine), calls=4, reads=fine * batches,
             cpu_s=f.unique * t.value("shard.plan_s_per_row"),
             rss_mb=base + min(sel, s.group_rows) * _PY_ROW_BYTES / 4 / _MB, scratch=f.unique * 400),
        Step(name="shard", tasks=n_shards, cpu_s=sel * t.value("shard.write_s_per_sample"),
             rss_mb=base + min(sel, s.samples_per_shard) * _PY_ROW_BYTES / _MB,
             written=sel * (a.image_bytes + t.value("bytes.shard_sample"))),
    ]  # fmt: skip


def report(cfg: RunConfig, f: Flow, t: ThroughputTable, a: Assumptions, c: Cluster) -> list[Step]:
    return [Step(name="report", tasks=f.parts, calls=8, cpu_s=f.unique * t.value("report.s_per_image"),
                 rss_mb=t.value("rss.report"), written=t.value("bytes.report"))]  # fmt: skip


#: Step builders by stage name, in pipeline order.
STAGE_STEPS = {"ingest": ingest, "embed": embed, "dedupe": dedupe, "cluster": cluster, "retrieve": retrieve,
               "shard": shard, "report": report}  # fmt: skip
