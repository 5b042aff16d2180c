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


def test_unset_precision_is_mixed_where_the_hardware_has_it(monkeypatch, tmp_path):
    import wsss.trainers as trainers

    monkeypatch.delenv("WSSS_DEFAULT_PRECISION", raising=False)
    read_cpuinfo = trainers.cpu_has_native_bf16
    cases = [  # (cuda available, cuda bf16, cpu bf16 instructions, accelerator) -> precision
        ((True, True, False, "auto"), "bf16-mixed"), ((True, False, True, "gpu"), "16-mixed"),
        ((True, True, True, "cpu"), "bf16-mixed"), ((True, True, False, "cpu"), "32-true"),
        ((False, False, True, "auto"), "bf16-mixed"), ((False, False, False, "auto"), "32-true"),
        ((False, False, True, "mps"), "32-true"), ((False, False, True, object()), "32-true"),
    ]
    for (cuda, cuda_bf16, cpu_bf16, accelerator), expected in cases:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, v=cuda_bf16, **k: v)
        monkeypatch.setattr(trainers, "cpu_has_native_bf16", lambda v=cpu_bf16: v)
        assert trainers.default_precision(accelerator) == expected, (cuda, cuda_bf16, cpu_bf16, accelerator)
    monkeypatch.setenv("WSSS_DEFAULT_PRECISION", "16-mixed")
    assert trainers.default_precision("cpu") == "16-mixed"

    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512bw avx512_vnni\n")
    monkeypatch.setattr(trainers.sys, "platform", "linux")
    assert read_cpuinfo(str(with_bf16)) and not read_cpuinfo(str(without)) and not read_cpuinfo(str(tmp_path / "missing"))


def test_the_trainer_gets_the_default_precision_only_when_the_config_leaves_it_unset(toy_root, tmp_path, monkeypatch):
    import wsss.trainers as trainers
    from pytorch_lightning.plugins.precision import MixedPrecision
    from wsss.stages.train_classifier import STAGE

    monkeypatch.delenv("WSSS_DEFAULT_PRECISION", raising=False)
    monkeypatch.setattr(trainers, "cpu_has_native_bf16", lambda: True)
    unset = [a for a in _train_args(toy_root, tmp_path)[1:]]
    cli_unset = trainers.TrainingCLI(STAGE, [*unset, "--trainer.precision", "null"])
    assert cli_unset.config["trainer.precision"] == "bf16-mixed"
    plugin = cli_unset.trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed"
    pinned = trainers.TrainingCLI(STAGE, [*unset, "--trainer.precision", "32-true"])
    assert pinned.config["trainer.precision"] == "32-true" and not isinstance(pinned.trainer.precision_plugin, MixedPrecision)


@pytest.mark.parametrize("system_name", ["classifier", "segmenter"])
def test_training_runs_channels_last_by_default_with_the_same_outputs_and_gradients(system_name):
    from wsss.systems.segmenter import SegmenterSystem

    build = {"classifier": lambda **kw: ClassifierSystem(weights="none", width=0.125, **kw),
             "segmenter": lambda **kw: SegmenterSystem(weights="none", width=0.125, **kw)}[system_name]
    torch.manual_seed(0)
    default = build().eval()  # eval: no dropout draws to tell the two apart
    torch.manual_seed(0)
    plain = build(channels_last=False).eval()
    convs = [m for m in default.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(not c.weight.is_contiguous() for c in convs if c.kernel_size != (1, 1))  # 1x1: both layouts coincide
    seen = []
    convs[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    images = torch.randn(2, 3, 40, 48)
    out_default, out_plain = default(images), plain(images)
    assert seen == [True]
    torch.testing.assert_close(out_default, out_plain, rtol=1e-4, atol=1e-5)
    out_default.square().sum().backward()
    out_plain.square().sum().backward()
    for (name, a), b in zip(default.named_parameters(), plain.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_a_best_score_of_zero_is_printed_as_zero():
    import torch

    from wsss.trainers import score_text

    assert score_text(torch.tensor(0.0)) == "0.0000" and score_text(None) == "none" and score_text(torch.tensor(0.25)) == "0.2500"
