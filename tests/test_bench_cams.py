"""scripts/bench_cams.py's batched bound does the work of the per-image limit: the same gradients."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_cams.py"
    spec = importlib.util.spec_from_file_location("bench_cams", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workload", ["vgg16", "resnet50-224"])
def test_the_batched_bound_computes_the_per_image_gradients(bench, workload):
    args = bench.parse_args(["--images", "4", "--classes", "2,1,3,1", "--height", "64", "--width", "80",
                             "--width-mult", "0.125"])
    model, images, classes = bench.make_workload(args, workload)
    if workload != "vgg16":  # ResNet-50 at 64x64: smaller images, same code path
        images = images[..., :64, :64]
    bound = bench.make_runner("bound", model, workload)(model, images, classes)
    limit = bench.make_runner("limit", model, workload)(model, images, classes)
    assert sorted(bound) == sorted(limit) == sorted((n, c) for n, ids in enumerate(classes) for c in ids)
    for key, grad in limit.items():
        assert bound[key].shape == grad.shape
        torch.testing.assert_close(bound[key], grad, rtol=1e-4, atol=1e-6)
    # and a wrong pairing of rows and classes is caught: the gradients differ between classes
    first, second = sorted(k for k in limit if k[0] == 0)
    assert not torch.allclose(limit[first], limit[second], atol=1e-6)


def test_the_stage_benchmark_runs_both_stages_against_their_models(toy_root, capsys):
    """scripts/bench_stages.py end to end on two toy photos (its figures come from real photos)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_stages.py"
    spec = importlib.util.spec_from_file_location("bench_stages", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--data-root", str(toy_root), "--images", "2", "--num-workers", "0"])
    printed = capsys.readouterr().out
    for stage in ("cams", "predict"):
        ratio = float(printed.split(f"{stage} stage / its model's own time: ")[1].split()[0])
        assert ratio > 0
