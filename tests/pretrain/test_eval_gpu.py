"""CUDA paths of the eval suite: bf16 autocast extraction and k-NN / linear probe on the GPU match the CPU."""

import numpy as np
import pytest
import torch

from pretrain.eval.config import KnnConfig, LinearConfig
from pretrain.eval.features import FeatureSet, extract_features
from pretrain.eval.knn import knn_evaluate
from pretrain.eval.linear import run_linear_probe
from pretrain.models import build_backbone

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_extraction_on_cuda_is_close_to_fp32():
    torch.manual_seed(0)
    model = build_backbone("vit_test", init_values=1.0)
    x = torch.randn(40, 3, 56, 56)
    batches = [(x[i:i + 16], torch.zeros(len(x[i:i + 16]), dtype=torch.int64), torch.arange(i, i + len(x[i:i + 16])),
                [str(j) for j in range(i, i + len(x[i:i + 16]))]) for i in range(0, 40, 16)]
    ref = extract_features(model, batches, mode="lastn_avgpool", n_last_blocks=2, device="cpu", precision="fp32")
    low = extract_features(model, batches, mode="lastn_avgpool", n_last_blocks=2, device="cuda", precision="auto")
    assert low.features.dtype == torch.float32 and low.features.device.type == "cpu"
    cos = torch.nn.functional.cosine_similarity(low.features, ref.features)
    assert cos.min() > 0.98


def test_knn_and_linear_on_cuda_match_cpu():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    ytr, yte = rng.integers(0, 6, 500), rng.integers(0, 6, 200)
    def fs(y):
        x = torch.tensor(centres[y] + rng.normal(size=(len(y), 16)), dtype=torch.float32)
        return FeatureSet(features=x, labels=torch.tensor(y), keys=[str(i) for i in range(len(y))], mode="cls",
                          embed_dim=16)
    train, test = fs(ytr), fs(yte)
    cfg = KnnConfig(ks=[10, 20, 600], chunk_size=64)
    cpu, gpu = knn_evaluate(train, test, cfg, device="cpu"), knn_evaluate(train, test, cfg, device="cuda")
    assert gpu.k_effective == [10, 20, 500]
    for a, b in zip(cpu.top1, gpu.top1):
        assert abs(a - b) <= 2 / 200  # float32 matmul order may swap a near-tie
    lin = run_linear_probe(train, lambda: test, LinearConfig(learning_rates=[0.1, 1.0], epochs=5, device="cuda"))
    assert lin.test_top1 > 0.8
