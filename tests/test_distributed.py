"""Two processes (DDP over gloo, on CPU) give the one-process results.

Predict stages (cams, pseudo-labels): every file written exactly once, byte-identical to a
one-process run. Training stages: validation scores every val image exactly once, so the val
metric in the checkpoint equals a single-process computation on the same checkpoint. The metric
itself: confusion counts summed across processes before any division.

The multi-process runs go through the real CLI in a subprocess: Lightning's DDP launcher starts
rank 1 by re-running that command line. Both runs use one intra-op thread per process (what
Lightning gives each of 2 CPU processes on a 2-core machine): CPU convolutions may round the last
float16 bit differently with another thread count.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from wsss.cli import main as cli
from wsss.data.modules import UnpaddedDistributedSampler, validation_sampler
from wsss.data.voc import VOCLayout
from wsss.errors import ConfigError
from wsss.formats.cams import write_cams
from wsss.formats.label_png import read_label_png
from wsss.metrics import SegmentationMetric, confusion_matrix, scores_from_confusion
from wsss.records import RECORD_FILE

REPO = Path(__file__).resolve().parents[1]
DDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
TRAINER_DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
WIDTH = "0.125"


def run_in_subprocess(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m wsss.cli ARGS`` in a fresh process importing this checkout, one thread per process."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "wsss.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert "Starting with 2 processes" in result.stdout + result.stderr, result.stderr[-3000:]
    return result


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_list(path: Path, ids: list[str]) -> Path:
    path.write_text("\n".join(ids) + "\n")
    return path


def assert_same_files(expected_dir: Path, actual_dir: Path, names: list[str]) -> None:
    """Both folders hold exactly ``names`` and their record (no temporary or extra files), byte for byte equal."""
    assert sorted(p.name for p in expected_dir.iterdir()) == sorted([*names, RECORD_FILE])
    assert sorted(p.name for p in actual_dir.iterdir()) == sorted([*names, RECORD_FILE])
    differing = [name for name in names if (expected_dir / name).read_bytes() != (actual_dir / name).read_bytes()]
    assert not differing, f"files differ between 1 and 2 processes: {differing}"


def checkpoint_score(path: Path) -> float:
    """The monitored validation score ModelCheckpoint stored in ``path``."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    states = [state for key, state in checkpoint["callbacks"].items() if key.startswith("ModelCheckpoint")]
    assert len(states) == 1
    return float(states[0]["best_model_score"])


# ----------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("size", range(8))
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_unpadded_sampler_gives_every_item_to_exactly_one_rank(size, world_size):
    shares = [list(UnpaddedDistributedSampler(range(size), world_size, rank)) for rank in range(world_size)]
    assert sorted(sum(shares, [])) == list(range(size))
    assert [len(UnpaddedDistributedSampler(range(size), world_size, rank)) for rank in range(world_size)] == [len(s) for s in shares]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_validation_needs_an_image_per_process():
    class TwoProcesses:
        distributed_sampler_kwargs = {"num_replicas": 2, "rank": 1}

    assert list(validation_sampler(range(3), TwoProcesses(), "--data.val_split")) == [1]
    assert validation_sampler(range(3), None, "--data.val_split") is None  # one process: plain order
    with pytest.raises(ConfigError, match="--data.val_split has 1 images, fewer than the 2 processes"):
        validation_sampler(range(1), TwoProcesses(), "--data.val_split")


def test_spawning_strategies_are_refused_before_any_work(toy_root, tmp_path, capsys):
    """ddp_spawn's processes end inside trainer.predict, taking the counts with them."""
    ids = VOCLayout(toy_root).read_ids("train")[:2]
    for image_id in ids:
        write_cams(tmp_path / "cams" / f"{image_id}.npz", classes=np.zeros(0, np.int64), cams=np.zeros((0, 4, 4), np.float16))
    args = ["pseudo-labels", "--data-root", str(toy_root), "--cams", str(tmp_path / "cams"), "--out", str(tmp_path / "out"),
            "--split", str(write_list(tmp_path / "ids.txt", ids)), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp_spawn"]
    assert cli(args) == 2
    assert "--strategy ddp_spawn" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == [RECORD_FILE]  # the settings asked for, no label


# ----------------------------------------------------------------------------- predict stages
def test_write_cams_gives_the_same_bytes_whenever_it_runs(tmp_path, monkeypatch):
    """Byte-for-byte comparisons of runs need files without timestamps."""
    arrays = {"classes": np.array([3, 15]), "cams": np.random.default_rng(0).random((2, 5, 7)).astype(np.float16)}
    write_cams(tmp_path / "now.npz", **arrays)
    later = time.time() + 400 * 86400
    monkeypatch.setattr(time, "time", lambda: later)
    write_cams(tmp_path / "later.npz", **arrays)
    assert (tmp_path / "now.npz").read_bytes() == (tmp_path / "later.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "later.npz") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    with np.load(tmp_path / "later.npz") as saved:
        assert all(np.array_equal(saved[k], v) and saved[k].dtype == v.dtype for k, v in arrays.items())


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory) -> Path:
    """A random narrow classifier saved the way train-cls saves it."""
    from wsss.systems.classifier import ClassifierSystem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        system = ClassifierSystem(weights="none", width=float(WIDTH))
    path = tmp_path_factory.mktemp("cls") / "classifier.ckpt"
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, path)
    return path


@pytest.mark.slow
def test_cams_under_ddp_write_each_file_once_identical_to_one_process(toy_root, classifier_ckpt, tmp_path, capsys):
    ids = VOCLayout(toy_root).read_ids("train")[:7]  # odd: the processes get 4 and 3 images
    split = write_list(tmp_path / "ids.txt", ids)
    args = ["cams", "--checkpoint", classifier_ckpt, "--data-root", toy_root, "--split", split, "--num-workers", "0", "--save-layers"]
    with one_thread():
        assert cli([*map(str, args), "--out", str(tmp_path / "one"), "--accelerator", "cpu"]) == 0
    capsys.readouterr()

    result = run_in_subprocess([*args, "--out", tmp_path / "two", *DDP], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Counts are totals over both processes, reported once: 7 writes for 7 files = each exactly once.
    assert result.stdout.count("CAM files written") == 1
    assert f"{len(ids)} CAM files written, 0 already complete" in result.stdout
    names = [f"{i}.npz" for i in ids]
    assert_same_files(tmp_path / "one", tmp_path / "two", names)

    # Resume with one image left, fewer than the processes: one of them has nothing to do.
    (tmp_path / "two" / names[3]).unlink()
    result = run_in_subprocess([*args, "--out", tmp_path / "two", *DDP], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"1 CAM files written, {len(ids) - 1} already complete" in result.stdout
    assert_same_files(tmp_path / "one", tmp_path / "two", names)


def blurred_gt_cams(mask: np.ndarray) -> dict[str, np.ndarray]:
    """A CAM file's arrays made from a GT mask: blurred one-hot maps of its classes."""
    classes = np.array(sorted(set(np.unique(mask).tolist()) - {0, 255}), dtype=np.int64)
    maps = [np.clip(gaussian_filter((mask == c).astype(np.float32), sigma=3.0), 0, 1) for c in classes]
    return {"classes": classes, "cams": np.stack(maps).astype(np.float16) if maps else np.zeros((0, *mask.shape), np.float16)}


@pytest.mark.slow
def test_pseudo_labels_under_ddp_write_each_file_once_identical_to_one_process(toy_root, tmp_path, capsys):
    layout = VOCLayout(toy_root)
    ids = layout.read_ids("train_aug")[:11]
    cams = tmp_path / "cams"
    for image_id in ids[1:]:  # ids[0] has no CAM file (--skip-missing)
        write_cams(cams / f"{image_id}.npz", **blurred_gt_cams(read_label_png(layout.mask_path(image_id))))
    broken = cams / f"{ids[4]}.npz"  # a damaged CAM file: reported, not fatal to the others
    broken.write_bytes(broken.read_bytes()[:100])
    good = [i for i in ids if i not in (ids[0], ids[4])]  # 9 images, split 5 / 4 over 2 processes
    split = write_list(tmp_path / "ids.txt", ids)
    args = ["pseudo-labels", "--data-root", toy_root, "--cams", cams, "--split", split, "--workers", "1", "--skip-missing", "--n-segments", "50"]
    expected_counts = f"{len(good)} written, 0 skipped (already done), 1 skipped (no CAM file), 1 failed"

    assert cli([*map(str, args), "--out", str(tmp_path / "one")]) == 2
    captured = capsys.readouterr()
    assert expected_counts in captured.out and "1 process)" in captured.out and str(broken) in captured.err

    result = run_in_subprocess([*args, "--out", tmp_path / "two", *DDP], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    # Totals over both processes, reported once, the failure named once whichever process met it.
    assert result.stdout.count("pseudo-labels ->") == 1
    assert expected_counts in result.stdout and "2 processes)" in result.stdout
    assert result.stderr.count(str(broken)) == 1 and "1 images failed" in result.stderr
    assert_same_files(tmp_path / "one", tmp_path / "two", [f"{i}.png" for i in good])


# ----------------------------------------------------------------------------- training stages
@pytest.mark.slow
def test_train_seg_under_ddp_validates_every_val_image_once(toy_root, tmp_path):
    from wsss.stages.evaluate import evaluate_labels

    layout = VOCLayout(toy_root)
    val_ids = layout.read_ids("val")[:3]  # odd: a padding sampler would score val_ids[0] twice
    val_split = write_list(tmp_path / "val.txt", val_ids)
    config = REPO / "configs" / "toy" / "segmenter.yaml"
    args = [
        "train-seg", "-c", config, "--data.root", toy_root, "--data.train_split", "train", "--data.train_labels", "gt",
        "--data.val_split", val_split, "--data.crop_size", "33", "--data.batch_size", "2", "--data.num_workers", "0",
        "--model.width", WIDTH, "--model.lr", "0.05",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp_path,
        "--trainer.logger.init_args.save_dir", tmp_path / "runs", "--checkpoint.dirpath", tmp_path / "ckpt", *TRAINER_DDP,
    ]
    result = run_in_subprocess(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    best = tmp_path / "ckpt" / "best.ckpt"
    ddp_miou = checkpoint_score(best)

    # One process on the same checkpoint: predict-seg + the evaluator.
    predict = ["predict-seg", "--checkpoint", best, "--data-root", toy_root, "--out", tmp_path / "pred", "--split", val_split,
               "--accelerator", "cpu", "--devices", "1", "--num-workers", "0"]
    assert cli(list(map(str, predict))) == 0
    scores = evaluate_labels(tmp_path / "pred", layout.mask_dir, val_ids)
    assert ddp_miou == pytest.approx(scores.miou, abs=1e-6)

    # The test can tell: scoring val_ids[0] twice, as DistributedSampler's padding would, differs.
    pairs = [(read_label_png(tmp_path / "pred" / f"{i}.png"), read_label_png(layout.mask_path(i))) for i in [*val_ids, val_ids[0]]]
    padded = scores_from_confusion(sum(confusion_matrix(pred, gt) for pred, gt in pairs))
    assert padded.miou != pytest.approx(scores.miou, abs=1e-4)


@pytest.mark.slow
def test_train_cls_under_ddp_validates_every_val_image_once(toy_root, tmp_path):
    from torchmetrics.functional.classification import multilabel_average_precision

    from wsss.data.datasets import ClassificationDataset
    from wsss.data.transforms import fit_transform
    from wsss.data.voc import ImageLabels
    from wsss.systems.checkpoints import load_classifier

    layout = VOCLayout(toy_root)
    val_ids = layout.read_ids("val")[:5]  # odd: 3 / 2 over the processes, in batches of 2 and 1
    val_split = write_list(tmp_path / "val.txt", val_ids)
    crop = 64
    args = [
        "train-cls", "-c", REPO / "configs" / "toy" / "classifier.yaml",
        "--data.root", toy_root, "--data.train_split", "train", "--data.val_split", val_split, "--data.crop_size", crop,
        "--data.num_workers", "0", "--data.batch_size", "2", "--model.width", WIDTH,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp_path,
        "--trainer.logger.init_args.save_dir", tmp_path / "runs", "--checkpoint.dirpath", tmp_path / "ckpt", *TRAINER_DDP,
    ]
    result = run_in_subprocess(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    best = tmp_path / "ckpt" / "best.ckpt"
    ddp_map = checkpoint_score(best)

    # One process, without Lightning: the checkpoint's classifier on the val images, AP per class
    # present, averaged.
    model = load_classifier(best)
    dataset = ClassificationDataset(layout, val_ids, ImageLabels(layout), fit_transform(crop))
    images = torch.stack([dataset[k]["image"] for k in range(len(dataset))])
    targets = torch.stack([dataset[k]["multi_hot"] for k in range(len(dataset))]).long()
    with torch.no_grad():
        probs = model(images).sigmoid()

    def mean_ap(rows: list[int]) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ap = multilabel_average_precision(probs[rows], targets[rows], num_labels=20, average=None)
        return float(ap[targets[rows].sum(0) > 0].mean())

    single = mean_ap(list(range(len(val_ids))))
    assert ddp_map == pytest.approx(single, abs=1e-6)
    assert mean_ap([*range(len(val_ids)), 0]) != pytest.approx(single, abs=1e-4)  # padding would show


# ----------------------------------------------------------------------------- the metric
def _label_maps(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """5 (prediction, GT) pairs of different sizes, GT with ignored pixels."""
    rng = np.random.default_rng(seed)
    pairs = []
    for height, width in [(7, 9), (12, 5), (4, 4), (10, 11), (6, 13)]:
        gt = rng.integers(0, 21, (height, width))
        gt[rng.random((height, width)) < 0.1] = 255
        pred = np.where(rng.random((height, width)) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, 21, (height, width)))
        pairs.append((pred, gt))
    return pairs


def _metric_process(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        metric = SegmentationMetric()
        for pred, gt in _label_maps(0)[rank::world_size]:  # uneven: 3 pairs on rank 0, 2 on rank 1
            metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
        local = metric.confusion.clone()
        scores = metric.scores()  # syncs: counts summed over both processes
        np.savez(Path(out_dir) / f"rank{rank}.npz", local=local.numpy(), confusion=scores.confusion, miou=scores.miou)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_segmentation_metric_sums_counts_across_processes(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_metric_process, args=(2, port, str(tmp_path)), nprocs=2, join=True)

    pairs = _label_maps(0)
    single = SegmentationMetric()
    expected = np.zeros((21, 21), np.int64)
    for pred, gt in pairs:
        single.update(torch.from_numpy(pred), torch.from_numpy(gt))
        keep = gt != 255  # independent count: NumPy, pixel by pixel
        np.add.at(expected, (gt[keep], pred[keep]), 1)
    single_scores = single.scores()
    np.testing.assert_array_equal(single_scores.confusion, expected)
    locals_ = []
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as saved:
            np.testing.assert_array_equal(saved["confusion"], expected)
            assert float(saved["miou"]) == single_scores.miou
            locals_.append(saved["local"])
    np.testing.assert_array_equal(locals_[0] + locals_[1], expected)
    assert not np.array_equal(locals_[0], expected), "each process saw only part of the pairs"
