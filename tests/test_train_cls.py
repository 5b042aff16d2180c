"""Stage 1 through its real CLI on the toy data."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from wsss.cli import main as cli
from wsss.errors import WeightsError
from wsss.systems.checkpoints import load_classifier
from wsss.systems.classifier import ClassifierSystem, mean_ap_of_present_classes
from wsss.systems.schedules import poly_factor

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "toy" / "classifier.yaml")


def _train_args(toy_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train-cls", "-c", CONFIG,
        "--data.root", str(toy_root), "--data.crop_size", "64", "--data.num_workers", "0", "--data.batch_size", "4",
        "--model.width", "0.125",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--checkpoint.dirpath", str(out / "ckpt"),
        *extra,
    ]


def test_train_cls_writes_checkpoints_that_load_again_and_resumes(toy_root, tmp_path, capsys):
    assert cli(_train_args(toy_root, tmp_path)) == 0
    assert "best checkpoint:" in capsys.readouterr().out
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(tmp_path / "ckpt" / name, map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == 3
        model = load_classifier(tmp_path / "ckpt" / name)
        torch.testing.assert_close(model.classifier.weight, checkpoint["state_dict"]["model.classifier.weight"])
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 20)
    # The resolved config is saved next to the logs, so the run can be reproduced.
    assert list((tmp_path / "runs").rglob("config.yaml"))
    # Resume: the step counter continues from the checkpoint.
    assert cli(_train_args(toy_root, tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))) == 0
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6


def test_train_cls_rejects_bad_data_before_training(toy_root, tmp_path, capsys):
    listed = tmp_path / "list.txt"
    listed.write_text("toy_00000\nmissing_1\n")
    assert cli(_train_args(toy_root, tmp_path, "--data.train_split", str(listed))) == 2
    assert "1 listed ids have no image" in capsys.readouterr().err and not (tmp_path / "ckpt").exists()
    listed.write_text("../../etc/passwd\n")
    assert cli(_train_args(toy_root, tmp_path, "--data.train_split", str(listed))) == 2
    assert "not plain image ids" in capsys.readouterr().err
    assert cli(_train_args(toy_root, tmp_path, "--data.root", str(tmp_path / "absent"))) == 2
    assert "data root not found" in capsys.readouterr().err


def test_unknown_config_key_lists_valid_ones(toy_root, tmp_path, capsys):
    assert cli(_train_args(toy_root, tmp_path, "--model.widht", "0.5")) == 2
    err = capsys.readouterr().err
    assert "wsss train-cls: error: unrecognized arguments: --model.widht" in err
    valid = re.search(r"^valid keys in 'model': (.+)$", err, re.MULTILINE)
    assert valid is not None and "width" in valid[1].split(", "), err[-2000:]


def test_loading_refuses_other_files(tmp_path):
    torch.save({"state_dict": {"model.fc8.weight": torch.zeros(1)}}, tmp_path / "seg.ckpt")
    with pytest.raises(WeightsError, match="not a classifier"):
        load_classifier(tmp_path / "seg.ckpt")
    # crafted pickles: tests/test_safe_loading.py, through every command that loads one


def test_poly_factor():
    assert poly_factor(0, 100, 0.9) == 1.0
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5 ** 0.9)
    assert poly_factor(100, 100, 0.9) == 0.0 and poly_factor(150, 100, 0.9) == 0.0


def test_validation_map_averages_only_classes_present_in_the_split():
    system = ClassifierSystem(weights="none", width=0.125)
    # 4 images; class 0: AP 1 (positives ranked first); class 1: positives ranked last of 4 ->
    # precision at its hits 1/3 and 2/4, AP = (1/3 + 1/2) / 2; the other 18 classes never occur.
    scores = torch.zeros(4, 20)
    scores[:, 0] = torch.tensor([0.9, 0.8, 0.1, 0.2])
    scores[:, 1] = torch.tensor([0.9, 0.8, 0.3, 0.2])
    targets = torch.zeros(4, 20, dtype=torch.long)
    targets[:2, 0] = 1
    targets[2:, 1] = 1
    system.val_metrics["ap"].update(scores, targets)
    system.val_metrics["positives"].update(targets)
    result = mean_ap_of_present_classes(system.val_metrics["ap"].compute(), system.val_metrics["positives"].compute())
    assert result.item() == pytest.approx((1.0 + (1 / 3 + 1 / 2) / 2) / 2)
