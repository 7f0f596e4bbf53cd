"""infra/ray: the cluster launcher config passes Ray's own schema validation, the runtime_env parses as a Ray
RuntimeEnv excluding the venv, the KubeRay manifest has CPU and GPU worker groups, submit.sh wraps ray job."""

from __future__ import annotations

import subprocess

import yaml

from .conftest import REPO

INFRA = REPO / "infra" / "ray"


def test_cluster_launcher_config_validates():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load((INFRA / "cluster.yaml").read_text()))
    validate_config(cfg)  # raises on schema errors
    types = cfg["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["docker"]["worker_image"].endswith(":cuda")
    assert "--gpus all" in types["gpu_worker"]["docker"]["worker_run_options"]


def test_runtime_env_and_kuberay_manifest():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((INFRA / "runtime_env.yaml").read_text()))
    assert ".venv/" in env["excludes"] and ".git/" in env["excludes"]
    manifest = yaml.safe_load((INFRA / "kuberay-raycluster.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    groups = {g["groupName"]: g for g in manifest["spec"]["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1 and "nvidia.com/gpu" not in str(groups["cpu"])
    assert manifest["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


def test_submit_script_usage():
    proc = subprocess.run([str(INFRA / "submit.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "submit.sh http://HEAD:8265 RECIPE.toml RUN_DIR" in proc.stderr
    assert subprocess.run(["bash", "-n", str(INFRA / "submit.sh")]).returncode == 0
