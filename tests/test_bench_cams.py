"""The benchmark scripts: bench_cams' batched bound does the work of the per-image limit (the same
gradients); bench_stages and bench_pipeline run end to end on small inputs."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_script("bench_cams")


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
    # batched and per-image convolutions sum in different orders (7e-4 of the peak gradient seen on
    # an AVX-only CPU); a mispaired class changes a gradient by about its peak
    scale = max(grad.abs().max().item() for grad in limit.values())
    for key, grad in limit.items():
        assert bound[key].shape == grad.shape
        torch.testing.assert_close(bound[key], grad, rtol=0, atol=5e-3 * scale)
    # and a wrong pairing of rows and classes is caught: the gradients differ between classes
    first, second = sorted(k for k in limit if k[0] == 0)
    assert not torch.allclose(limit[first], limit[second], rtol=0, atol=5e-3 * scale)


def test_the_stage_benchmark_runs_both_stages_against_their_models(toy_root, capsys):
    """scripts/bench_stages.py end to end on two toy photos (its figures come from real photos)."""
    module = _load_script("bench_stages")
    module.main(["--data-root", str(toy_root), "--images", "2", "--num-workers", "0"])
    printed = capsys.readouterr().out
    times = {" ".join(line.split()[:2]): float(line.split()[2]) for line in printed.splitlines()
             if "own time" not in line and line.split()[:2] in (["cams", "stage"], ["cams", "model"], ["predict", "stage"], ["predict", "model"])}
    for stage in ("cams", "predict"):
        ratio = float(printed.split(f"{stage} stage / its model's own time: ")[1].split()[0])
        # the ratio is the stage's time over its bare model's, both timed (not a constant or one of them)
        stage_s, model_s = times[f"{stage} stage"], times[f"{stage} model"]
        assert stage_s > 0 and model_s > 0.005
        assert (stage_s - 0.005) / (model_s + 0.005) - 0.0005 <= ratio <= (stage_s + 0.005) / (model_s - 0.005) + 0.0005  # to the print's rounding


def test_the_pipeline_benchmark_times_every_stage_and_projects_both_presets(monkeypatch, capsys):
    """scripts/bench_pipeline.py end to end on shrunken shapes (its figures come from a GPU): every
    stage timed, the refinement included, and both projections' totals the sums of their lines."""
    module = _load_script("bench_pipeline")
    monkeypatch.setattr(module, "IMAGE", (64, 80))
    monkeypatch.setitem(module.PAPER, "classifier_batch", 2)
    monkeypatch.setitem(module.PAPER, "classifier_crop", 64)
    preset = module.refine_options()
    monkeypatch.setattr(module, "refine_options", lambda: dataclasses.replace(preset, batch_size=2, crop_size=64))
    monkeypatch.setitem(module.PAPER, "segmenter_batch", 2)
    monkeypatch.setitem(module.PAPER, "segmenter_crop", 65)
    module.main(["--device", "cpu", "--steps", "1", "--cam-batch", "2", "--precision", "fp32"])
    printed = capsys.readouterr().out
    rates = dict(re.findall(r"^  (\S.*?) +([\d.]+) s$", printed, re.MULTILINE))
    assert set(rates) == {"classifier step", "CAM image", "affinity step", "refine image (1 CAM folder)",
                          "pseudo-label image (1 CPU process)", "segmenter step", "prediction image"}
    assert all(float(seconds) > 0 for seconds in rates.values())
    minutes = [(name, float(value)) for name, value in re.findall(r"^  (\S.*?) +([\d.]+) min", printed, re.MULTILINE)]
    assert [name for name, _ in minutes].count("total") == 1
    paper, total = minutes[:5], minutes[5]
    refinement, with_refinement = minutes[6:8], minutes[8]
    assert total[0] == "total" and with_refinement[0] == "total with the refinement"
    assert total[1] == pytest.approx(sum(value for _, value in paper), abs=0.3)
    assert with_refinement[1] == pytest.approx(total[1] + sum(value for _, value in refinement), abs=0.3)
