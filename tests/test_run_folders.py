"""Run folders that never lie: every per-image stage records what made its folder, refuses to mix
two runs into one, and resumes only with the same settings; resource settings change no file;
`wsss run` rebuilds a step exactly when its results would change, and says why."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from wsss.cli import main as cli
from wsss.data.voc import VOCLayout
from wsss.records import RECORD_FILE, read_record


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory) -> Path:
    from wsss.systems.classifier import ClassifierSystem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        system = ClassifierSystem(weights="none", width=0.125)
    path = tmp_path_factory.mktemp("cls") / "classifier.ckpt"
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, path)
    return path


def segmenter_ckpt(folder: Path, seed: int) -> Path:
    from wsss.systems.segmenter import SegmenterSystem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        system = SegmenterSystem(weights="none", width=0.125)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"segmenter{seed}.ckpt"
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, path)
    return path


def cams(toy_root, ckpt, out, *extra) -> int:
    return cli(["cams", "--checkpoint", str(ckpt), "--data-root", str(toy_root), "--split", "train", "--out", str(out),
                "--num-workers", "0", "--accelerator", "cpu", *extra])


def pseudo(toy_root, cam_dir, out, *extra) -> int:
    return cli(["pseudo-labels", "--data-root", str(toy_root), "--cams", str(cam_dir), "--out", str(out), "--split", "train",
                "--workers", "1", "--n-segments", "50", *extra])


def predict(toy_root, ckpt, out, *extra) -> int:
    return cli(["predict-seg", "--checkpoint", str(ckpt), "--data-root", str(toy_root), "--out", str(out), "--split", "val",
                "--accelerator", "cpu", "--devices", "1", "--num-workers", "0", *extra])


def contents(folder: Path, suffix: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(f"*{suffix}"))}


# ----------------------------------------------------------------------------- one stage, one folder


def test_cams_rerun_with_another_method_is_refused_then_redone_with_overwrite(toy_root, classifier_ckpt, tmp_path, capsys):
    out = tmp_path / "cams"
    assert cams(toy_root, classifier_ckpt, out) == 0
    first = contents(out, ".npz")
    record = read_record(out)
    assert record["stage"] == "cams" and record["params"]["method"] == "layercam" and record["inputs"]["classifier"].startswith("sha256:")
    assert "num_workers" not in record["params"] and record["resources"]["num_workers"] == 0
    capsys.readouterr()
    assert cams(toy_root, classifier_ckpt, out, "--method", "gradcam", "--layers", "stage5", "--scaled", "") == 2
    err = capsys.readouterr().err
    assert "method: 'layercam' -> 'gradcam'" in err and "--overwrite" in err and "0 CAM files written" not in err
    assert contents(out, ".npz") == first  # refused before any work
    assert cams(toy_root, classifier_ckpt, out, "--method", "gradcam", "--layers", "stage5", "--scaled", "", "--overwrite") == 0
    redone = contents(out, ".npz")
    assert redone.keys() == first.keys() and all(redone[k] != first[k] for k in first)
    assert read_record(out)["params"]["method"] == "gradcam"


def test_cams_resume_with_the_same_settings_skips_whatever_the_resources(toy_root, classifier_ckpt, tmp_path, capsys):
    out = tmp_path / "cams"
    assert cams(toy_root, classifier_ckpt, out) == 0
    first = contents(out, ".npz")
    (out / sorted(first)[0]).unlink()
    capsys.readouterr()
    assert cams(toy_root, classifier_ckpt, out, "--batch-size", "4", "--num-workers", "2") == 0
    assert "1 CAM files written" in capsys.readouterr().out
    assert contents(out, ".npz") == first


def test_cams_of_another_classifier_or_without_a_record_are_refused(toy_root, classifier_ckpt, tmp_path, capsys):
    out = tmp_path / "cams"
    assert cams(toy_root, classifier_ckpt, out) == 0
    other = tmp_path / "other.ckpt"
    checkpoint = torch.load(classifier_ckpt, weights_only=True)
    name = next(k for k in checkpoint["state_dict"] if k.endswith("bias"))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 1
    torch.save(checkpoint, other)
    capsys.readouterr()
    assert cams(toy_root, other, out) == 2
    assert "input classifier: 'sha256:" in capsys.readouterr().err
    (out / RECORD_FILE).unlink()  # files of unknown origin (an older wsss, another tool)
    assert cams(toy_root, classifier_ckpt, out) == 2
    assert "no record of the settings that made them" in capsys.readouterr().err


def test_pseudo_labels_rerun_with_another_threshold_or_cam_folder_is_refused(toy_root, classifier_ckpt, tmp_path, capsys):
    cam_a, cam_b, out = tmp_path / "cams_a", tmp_path / "cams_b", tmp_path / "pseudo"
    assert cams(toy_root, classifier_ckpt, cam_a) == 0
    assert cams(toy_root, classifier_ckpt, cam_b, "--fusion", "mean") == 0
    assert pseudo(toy_root, cam_a, out) == 0
    first = contents(out, ".png")
    capsys.readouterr()
    assert pseudo(toy_root, cam_a, out, "--threshold", "0.5") == 2
    assert "threshold: 0.3 -> 0.5" in capsys.readouterr().err
    assert pseudo(toy_root, cam_b, out) == 2
    assert "input cams: 'record:" in capsys.readouterr().err
    assert contents(out, ".png") == first
    assert pseudo(toy_root, cam_a, out, "--threshold", "0.5", "--overwrite") == 0
    assert read_record(out)["params"]["threshold"] == 0.5 and contents(out, ".png") != first
    # A copied CAM folder is the same input (its record travels with it): reused, not refused.
    shutil.copytree(cam_a, tmp_path / "cams_copy")
    assert pseudo(toy_root, tmp_path / "cams_copy", out, "--threshold", "0.5") == 0
    assert "0 written" in capsys.readouterr().out


def test_predict_seg_with_another_checkpoint_is_refused(toy_root, tmp_path, capsys):
    first, second = segmenter_ckpt(tmp_path, 0), segmenter_ckpt(tmp_path, 1)
    out = tmp_path / "pred"
    assert predict(toy_root, first, out) == 0
    before = contents(out, ".png")
    capsys.readouterr()
    assert predict(toy_root, second, out) == 2
    assert "input segmenter: 'sha256:" in capsys.readouterr().err
    assert predict(toy_root, first, out, "--flip") == 2
    assert "flip: False -> True" in capsys.readouterr().err
    assert contents(out, ".png") == before
    assert predict(toy_root, second, out, "--overwrite") == 0
    assert read_record(out)["inputs"]["segmenter"] != json.dumps(None)


# ----------------------------------------------------------------------------- resource settings change no file


def test_cam_workers_and_batch_size_change_no_map(toy_root, classifier_ckpt, tmp_path):
    """num_workers 0 vs 2: byte-identical files. Batch 1 vs 4 (equal-sized images share a forward):
    the same maps to float16 rounding (atol 2e-3, one float16 step near 1 is 1e-3)."""
    assert cams(toy_root, classifier_ckpt, tmp_path / "w0", "--save-layers") == 0
    assert cli(["cams", "--checkpoint", str(classifier_ckpt), "--data-root", str(toy_root), "--split", "train",
                "--out", str(tmp_path / "w2"), "--num-workers", "2", "--accelerator", "cpu", "--save-layers"]) == 0
    assert contents(tmp_path / "w0", ".npz") == contents(tmp_path / "w2", ".npz")
    assert cams(toy_root, classifier_ckpt, tmp_path / "b4", "--save-layers", "--batch-size", "4") == 0
    for path in sorted((tmp_path / "w0").glob("*.npz")):
        with np.load(path) as a, np.load(tmp_path / "b4" / path.name) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_allclose(a[key].astype(np.float32), b[key].astype(np.float32), atol=2e-3)


def test_pseudo_label_workers_change_no_label(toy_root, classifier_ckpt, tmp_path):
    assert cams(toy_root, classifier_ckpt, tmp_path / "cams") == 0
    assert pseudo(toy_root, tmp_path / "cams", tmp_path / "one") == 0
    assert pseudo(toy_root, tmp_path / "cams", tmp_path / "two", "--workers", "2") == 0
    assert contents(tmp_path / "one", ".png") == contents(tmp_path / "two", ".png")


def test_prediction_workers_and_batch_size_change_no_label(toy_root, tmp_path):
    checkpoint = segmenter_ckpt(tmp_path, 0)
    assert predict(toy_root, checkpoint, tmp_path / "a") == 0
    assert predict(toy_root, checkpoint, tmp_path / "b", "--num-workers", "2", "--batch-size", "3") == 0
    a, b = contents(tmp_path / "a", ".png"), contents(tmp_path / "b", ".png")
    assert a.keys() == b.keys() and a == b


def test_eval_cams_workers_change_no_number(toy_root, classifier_ckpt, tmp_path):
    assert cams(toy_root, classifier_ckpt, tmp_path / "cams") == 0
    gt = VOCLayout(toy_root).mask_dir
    for workers in ("1", "2"):
        assert cli(["eval-cams", "--cams", str(tmp_path / "cams"), "--gt", str(gt), "--thresholds", "0.1,0.5",
                    "--workers", workers, "--json", str(tmp_path / f"w{workers}.json")]) == 0
    assert json.loads((tmp_path / "w1.json").read_text()) == json.loads((tmp_path / "w2.json").read_text())


# ----------------------------------------------------------------------------- wsss run


@pytest.fixture(scope="module")
def small_run(toy_root, tmp_path_factory):
    """A `wsss run --until eval-pseudo` on the tiny configuration, from configs copied into a
    folder of their own (so a test can move them)."""
    from test_pipeline import tiny_config

    base = tmp_path_factory.mktemp("folders")
    checkout = base / "checkout_a"
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs" / "toy", checkout / "configs")
    config = tiny_config(base / "pipeline.yaml", toy_root, base / "out")
    raw = yaml.safe_load(config.read_text())
    for section in ("classifier", "segmenter"):
        raw[section]["config"] = str(checkout / "configs" / Path(raw[section]["config"]).name)
    config.write_text(yaml.safe_dump(raw))
    assert cli(["run", "-c", str(config), "--until", "eval-pseudo"]) == 0
    return base


def copy_of(small_run: Path, tmp_path: Path, **changes) -> tuple[Path, Path]:
    out = tmp_path / "out"
    shutil.copytree(small_run / "out", out)
    raw = yaml.safe_load((small_run / "pipeline.yaml").read_text())
    raw["out"] = str(out)
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "pipeline.yaml", out


def decisions(printed: str) -> dict[str, str]:
    """Step -> what the run (or --explain) first said of it."""
    said: dict[str, str] = {}
    for line in printed.splitlines():
        if line.startswith("["):
            said.setdefault(line.split("] ", 1)[1].split(":")[0], line.split(": ", 1)[1])
    return said


def all_reused(said: dict[str, str]) -> bool:
    """Every step up to eval-pseudo reused; the opt-in refine step is off."""
    return said.pop("refine") == "off" and set(said.values()) == {"skipped (up to date)"}


@pytest.mark.parametrize("changes", [
    {"cams": {"num_workers": 2, "batch_size": 1, "channels_last": True, "accelerator": "cpu", "devices": 1}},
    {"eval_cams": {"workers": 2}, "pseudo": {"workers": 2}},
])
def test_resource_settings_reuse_every_step(small_run, tmp_path, capsys, changes):
    config, _ = copy_of(small_run, tmp_path, **changes)
    assert cli(["run", "-c", str(config), "--until", "eval-pseudo"]) == 0
    assert all_reused(decisions(capsys.readouterr().out))


def test_an_option_that_matters_rebuilds_its_step_and_the_later_ones_only_and_explain_says_why(small_run, tmp_path, capsys):
    config, out = copy_of(small_run, tmp_path, cams={"fusion": "mean"})
    assert cli(["run", "-c", str(config), "--until", "eval-pseudo", "--explain"]) == 0
    explained = decisions(capsys.readouterr().out)
    assert explained["classifier"].startswith("reuse (outputs up to date)")
    assert explained["cams"].startswith("run (") and "section.fusion: 'max' -> 'mean'" in explained["cams"]
    assert "reads 'cams', which will run" in explained["eval-cams"]
    assert "reads 'eval-cams', which will run" in explained["pseudo-labels"] or "reads 'cams" in explained["pseudo-labels"]
    assert not (out / "manifests" / "cams.json").read_text().count('"mean"')  # --explain ran nothing
    assert cli(["run", "-c", str(config), "--until", "eval-pseudo"]) == 0
    ran = decisions(capsys.readouterr().out)
    assert ran["classifier"] == "skipped (up to date)"
    assert all(ran[step].startswith("running") for step in ("cams", "eval-cams", "pseudo-labels", "eval-pseudo"))


def test_a_moved_checkout_and_data_reuse_everything(small_run, toy_root, tmp_path, capsys):
    """The stage YAMLs and the dataset at other paths, the same contents: nothing is rebuilt (the
    hash covers resolved values and the data's ids and sizes, not paths or YAML text)."""
    moved_configs = tmp_path / "checkout_b" / "configs"
    shutil.copytree(small_run / "checkout_a" / "configs", moved_configs)
    for path in moved_configs.glob("*.yaml"):  # comments change nothing
        path.write_text("# a comment\n" + path.read_text())
    moved_data = tmp_path / "data" / "VOC2012"
    shutil.copytree(toy_root, moved_data)
    config, _ = copy_of(small_run, tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["data_root"] = str(moved_data)
    for section in ("classifier", "segmenter"):
        raw[section]["config"] = str(moved_configs / Path(raw[section]["config"]).name)
    config.write_text(yaml.safe_dump(raw))
    assert cli(["run", "-c", str(config), "--until", "eval-pseudo"]) == 0
    assert all_reused(decisions(capsys.readouterr().out))
    # ...while a training option that matters rebuilds the classifier and everything after it.
    raw["classifier"]["data"] = {**raw["classifier"].get("data", {}), "crop_size": 72}
    config.write_text(yaml.safe_dump(raw))
    assert cli(["run", "-c", str(config), "--until", "eval-cams", "--explain"]) == 0
    explained = decisions(capsys.readouterr().out)
    assert "training.data.crop_size: 64 -> 72" in explained["classifier"], explained


def test_a_missing_data_root_is_an_error_everywhere_but_the_toy_presets(tmp_path, capsys):
    from test_pipeline import CONFIGS

    raw = yaml.safe_load((CONFIGS / "pipeline.yaml").read_text())
    assert raw["data_root"] == "toy"  # the toy preset names the toy
    del raw["data_root"]
    raw["classifier"]["config"] = str(CONFIGS / "classifier.yaml")
    raw["segmenter"]["config"] = str(CONFIGS / "segmenter.yaml")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["run", "-c", str(tmp_path / "pipeline.yaml"), "--print-config"]) == 2
    assert "data_root is required" in capsys.readouterr().err
    stage = yaml.safe_load((CONFIGS / "classifier.yaml").read_text())
    assert stage["data"].pop("root") == "toy"
    (tmp_path / "classifier.yaml").write_text(yaml.safe_dump(stage))
    assert cli(["train-cls", "-c", str(tmp_path / "classifier.yaml"), "--trainer.max_steps", "1"]) == 2
    assert "data.root" in capsys.readouterr().err


def test_mixed_precision_training_runs_end_to_end_on_the_cpu(toy_root, tmp_path, monkeypatch):
    """The default the users get on a bf16 CPU (the suite pins fp32 elsewhere): a bf16-mixed
    classifier and segmenter step on the CPU, finite losses, checkpoints written."""
    from wsss.trainers import default_precision

    monkeypatch.delenv("WSSS_DEFAULT_PRECISION", raising=False)
    if default_precision("cpu") != "bf16-mixed":
        pytest.skip("this CPU has no bf16 instructions: wsss trains in fp32 here (wsss.trainers.default_precision)")
    from wsss.stages.train_classifier import train_classifier
    from wsss.systems.classifier import ClassifierSystem

    seen = []
    real_step = ClassifierSystem.training_step

    def recording_step(self, batch, batch_idx):
        loss = real_step(self, batch, batch_idx)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), float(loss)))
        return loss

    monkeypatch.setattr(ClassifierSystem, "training_step", recording_step)
    trained = train_classifier({
        "model": {"weights": "none", "width": 0.125, "batch_norm": True},
        "data": {"root": str(toy_root), "train_split": "train", "crop_size": 64, "batch_size": 4, "num_workers": 0},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "limit_val_batches": 2},
        "checkpoint": {"dirpath": str(tmp_path / "cls")},
    })
    assert len(seen) == 2 and all(enabled and dtype == torch.bfloat16 and np.isfinite(loss) for enabled, dtype, loss in seen), seen
    state = torch.load(trained.last, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
