"""Launchers without a cluster: shell syntax, exact torchrun commands (dry run), the SLURM script with stand-in
``srun``/``scontrol`` (including requeue on USR1), and a real Ray Train run on 2 CPU workers in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_SH = REPO / "infra" / "launch" / "torchrun.sh"
SBATCH = REPO / "infra" / "launch" / "slurm.sbatch"


def _bash(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NPROC_PER_NODE", "HEAD_ADDR", "RDZV_ID")}
    full_env.update(env or {})
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=60)


@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH])
def test_scripts_parse(script):
    result = _bash("-n", str(script))
    assert result.returncode == 0, result.stderr


def test_torchrun_dry_run_prints_exact_multinode_command():
    result = _bash(str(TORCHRUN_SH), "--dry-run", "--nnodes", "4", "--nproc-per-node", "8", "--head", "node001",
                   "--rdzv-id", "job7", "pretrain/recipes/vitl14.toml", "--out", "/shared/runs/l14",
                   "--set", "optim.base_lr=2e-3", "--set", "train.name=a b")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node001:29400 "
        "--rdzv_id=job7 --max_restarts=0 -m pretrain train pretrain/recipes/vitl14.toml --out /shared/runs/l14 "
        "--set optim.base_lr=2e-3 --set train.name=a\\ b"
    )


def test_torchrun_single_node_uses_standalone_and_env_defaults():
    result = _bash(str(TORCHRUN_SH), "r.toml", "--out", "runs/x",
                   env={"DRY_RUN": "1", "NPROC_PER_NODE": "2", "TORCHRUN": "/opt/bin/torchrun"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "/opt/bin/torchrun --nnodes=1 --nproc_per_node=2 --standalone --max_restarts=0 -m pretrain train r.toml "
        "--out runs/x"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nnodes", "2", "r.toml", "--out", "x"], "--head HOST is required"),
        (["--head", "h", "r.toml"], "missing --out"),
        (["--head", "h"], "missing RECIPE"),
        (["--bogus", "r.toml", "--out", "x"], "unknown launcher option --bogus"),
        (["--nproc-per-node", "eight", "r.toml", "--out", "x"], "--nproc-per-node must be"),
    ],
)
def test_torchrun_rejects_bad_arguments(args, message):
    result = _bash(str(TORCHRUN_SH), "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr


def _fake_slurm_bin(tmp_path: Path, srun_sleep: float = 0.0) -> Path:
    """Stand-ins for srun (runs the per-node command once, in dry-run mode) and scontrol (logs requeues)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" > {tmp_path}/srun.args\n'
        f"touch {tmp_path}/srun.started\n"
        f"sleep {srun_sleep}\n"
        'while [[ $1 == --* ]]; do shift; done\n'
        'DRY_RUN=1 exec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ $1 == show && $2 == hostnames ]]; then echo node-a; echo node-b; exit 0; fi\n'
        f'echo "$*" >> {tmp_path}/scontrol.log\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _slurm_env(bin_dir: Path) -> dict:
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]",
            "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_RESTART_COUNT": "1", "SLURM_SUBMIT_DIR": str(REPO)}


def test_sbatch_runs_torchrun_on_every_node_with_c10d_rendezvous(tmp_path):
    bin_dir = _fake_slurm_bin(tmp_path)
    result = _bash(str(SBATCH), "pretrain/recipes/vits14.toml", "/shared/runs/s14", "optim.base_lr=1e-3",
                   env=_slurm_env(bin_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    srun_args = (tmp_path / "srun.args").read_text().split()
    assert srun_args[:3] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "--nodes=2"]
    torchrun_line = result.stdout.strip().splitlines()[-1]
    assert torchrun_line == (
        "torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=node-a:29400 "
        "--rdzv_id=4242-1 --max_restarts=0 -m pretrain train pretrain/recipes/vits14.toml --out /shared/runs/s14 "
        "--set optim.base_lr=1e-3"
    )
    bad = _bash(str(SBATCH), "r.toml", "/runs/x", "not-an-override", env=_slurm_env(bin_dir), cwd=tmp_path)
    assert bad.returncode == 2 and "section.field=value" in bad.stderr


def test_sbatch_requeues_itself_on_usr1(tmp_path):
    bin_dir = _fake_slurm_bin(tmp_path, srun_sleep=3)
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NPROC_PER_NODE", "HEAD_ADDR", "RDZV_ID")}
    env.update(_slurm_env(bin_dir))
    proc = subprocess.Popen(["bash", str(SBATCH), "r.toml", "/runs/x"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun.started").exists():
        assert time.monotonic() < deadline, "srun stand-in never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in out
    assert out.strip().splitlines()[-1].startswith("torchrun --nnodes=2")  # the run itself went on


def _probe_entry(argv: list[str]) -> None:
    """Stand-in trainer entry: adopt Ray's process group, prove it works, record what each worker saw."""
    import torch
    import torch.distributed as dist

    from pretrain.parallel import init_distributed

    info = init_distributed()
    total = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(total)
    out = Path(argv[argv.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": info.rank, "world_size": info.world_size, "backend": info.backend,
              "pg_backend": str(dist.get_backend()), "all_reduce": total.item(), "argv": argv,
              "env": [os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")], "cwd": os.getcwd()}
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))


def test_ray_train_entrypoint_runs_two_gloo_workers(tmp_path, ray_session):
    from infra.launch import ray_train

    out = tmp_path / "run"
    result = ray_train.main(["--recipe", "pretrain/recipes/tiny.toml", "--out", str(out), "--set", "train.steps=2",
                             "--num-workers", "2", "--entry", f"{__name__}:_probe_entry"])
    assert result.error is None
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, rec in enumerate(records):
        assert (rec["rank"], rec["world_size"], rec["backend"], rec["pg_backend"]) == (rank, 2, "gloo", "gloo")
        assert rec["all_reduce"] == 3.0  # 1 + 2: a working 2-process group
        assert rec["env"] == [str(rank), "2", str(rank)]
        assert rec["cwd"] == os.getcwd()  # relative recipe/data paths resolve as on the driver
        assert rec["argv"] == ["pretrain/recipes/tiny.toml", "--out", str(out), "--set", "train.steps=2"]


def test_ray_train_rejects_bad_arguments_before_starting_ray(capsys):
    from infra.launch import ray_train

    with pytest.raises(SystemExit) as exc:
        ray_train.main(["--recipe", "r.toml", "--out", "x", "--num-workers", "2", "--entry", "nodots"])
    assert exc.value.code == 2 and "module:function" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ray_train.main(["--recipe", "r.toml", "--out", "x", "--num-workers", "0"])
    assert "--num-workers must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="section.field=value"):
        ray_train.train_argv("r.toml", "x", ["oops"])
