"""`wsss run`: every stage end to end on a tiny configuration, skipping, partial re-runs, kill + resume, errors."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from wsss.cli import main as cli_main
from wsss.pipeline import STAGES
from wsss.records import RECORD_FILE

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "toy"
KILL_HARNESS = Path(__file__).resolve().parent / "kill_harness.py"  # runs a command that SIGKILLs itself at a chosen write


def tiny_config(path: Path, root: Path, out: Path, **changes) -> Path:
    config = {
        "data_root": str(root), "out": str(out), "cam_split": "train", "eval_split": "train", "val_split": "val",
        "classifier": {"config": str(CONFIGS / "classifier.yaml"),
                       "model": {"width": 0.125}, "trainer": {"max_epochs": 1},
                       "data": {"crop_size": 64, "batch_size": 8, "num_workers": 0}},
        "cams": {"num_workers": 0, "batch_size": 4},
        "eval_cams": {"thresholds": "0.1,0.5"},
        "pseudo": {"threshold": 0.3, "n_segments": 50, "workers": 1},
        "segmenter": {"config": str(CONFIGS / "segmenter.yaml"),
                      # as the demo: the trunk starts from this run's (batch-norm) classifier
                      "model": {"width": 0.125, "batch_norm": True, "weights": "classifier"},
                      "trainer": {"max_steps": 2, "val_check_interval": 2},
                      "data": {"crop_size": 33, "batch_size": 2, "num_workers": 0}},
        "predict": {"num_workers": 0},
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}


@pytest.fixture(scope="module")
def finished_run(toy_root, tmp_path_factory):
    """One complete `wsss run` on the tiny configuration (shared; tests copy it before changing anything)."""
    base = tmp_path_factory.mktemp("pipeline")
    config = tiny_config(base / "pipeline.yaml", toy_root, base / "out")
    assert cli_main(["run", "-c", str(config)]) == 0
    return base / "out"


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


def test_run_writes_every_stage_and_results(finished_run, toy_root):
    out = finished_run
    train = (toy_root / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (toy_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert (out / "classifier/best.ckpt").is_file() and (out / "classifier/last.ckpt").is_file()
    for variant in ("layercam", "gradcam", "gradcampp"):
        assert sorted(p.stem for p in (out / "cams" / variant).glob("*.npz")) == sorted(train)
    with np.load(out / "cams/layercam" / f"{train[0]}.npz") as data:
        assert {"cams", "classes", "stage3", "stage4", "stage5"} <= set(data.files)
    for variant in ("layercam", "gradcam"):
        assert sorted(p.stem for p in (out / "pseudo" / variant).glob("*.png")) == sorted(train)
    assert (out / "segmenter/last.ckpt").is_file()
    assert sorted(p.stem for p in (out / "predictions/val").glob("*.png")) == sorted(val)
    assert sorted(p.stem for p in (out / "predictions/train").glob("*.png")) == sorted(train)
    for stage in STAGES:
        if stage == "refine":  # opt-in: off in this configuration, so nothing is written for it
            assert not (out / "manifests" / "refine.json").exists() and not (out / "refined").exists()
            continue
        manifest = json.loads((out / "manifests" / f"{stage}.json").read_text())
        assert manifest["finished"] is True and manifest["hash"]
    results = json.loads((out / "results.json").read_text())
    methods = [(r["stage"], r["method"]) for r in results["rows"]]
    assert ("CAM seeds", "LayerCAM stage3") in methods and ("pseudo-labels", "Grad-CAM stage5") in methods
    values = [r["value"] for r in results["rows"]]
    assert values and all(v is not None and 0 <= v <= 1 for v in values), results["rows"]  # every row scored
    assert results["data_root"] == str(toy_root.resolve())


def test_results_carry_the_scores_the_checkpoints_stored(finished_run):
    """The classifier's val mAP in results.json and the segmenter's val mIoU in its manifest are the
    best_model_score that ModelCheckpoint stored in each best.ckpt (read here with torch alone)."""
    def stored_score(path: Path) -> float:
        callbacks = torch.load(path, map_location="cpu", weights_only=True)["callbacks"]
        (state,) = [state for key, state in callbacks.items() if key.startswith("ModelCheckpoint")]
        return float(state["best_model_score"])

    results = json.loads((finished_run / "results.json").read_text())
    (classifier,) = [row for row in results["rows"] if row["stage"] == "classifier"]
    assert classifier["value"] is not None and classifier["value"] == stored_score(finished_run / "classifier/best.ckpt")
    segmenter = json.loads((finished_run / "manifests/segmenter.json").read_text())["results"]
    assert segmenter["val_mIoU"] is not None and segmenter["val_mIoU"] == stored_score(finished_run / "segmenter/best.ckpt")


def test_second_run_skips_everything(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    config = tiny_config(tmp_path / "pipeline.yaml", Path(json.loads((out / "results.json").read_text())["data_root"]), out)
    before = snapshot(out)
    assert cli_main(["run", "-c", str(config)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (up to date)") == len(STAGES) - 1 and "] refine: off" in printed  # refine is opt-in
    assert snapshot(out) == before


def test_changed_option_reruns_that_stage_and_later_only(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    root = Path(json.loads((out / "results.json").read_text())["data_root"])
    config = tiny_config(tmp_path / "pipeline.yaml", root, out, pseudo={"threshold": 0.5})
    before = snapshot(out)
    assert cli_main(["run", "-c", str(config)]) == 0
    printed = capsys.readouterr().out
    after = snapshot(out)
    for stage in ("classifier", "cams", "eval-cams"):
        assert f"] {stage}: skipped (up to date)" in printed
        assert after[f"manifests/{stage}.json"] == before[f"manifests/{stage}.json"]
    assert all(after[k] == before[k] for k in before if k.startswith(("cams/", "classifier/")))
    for stage in ("pseudo-labels", "eval-pseudo", "segmenter", "predict", "evaluate"):
        assert f"] {stage}: running" in printed
        assert after[f"manifests/{stage}.json"] != before[f"manifests/{stage}.json"]
    assert json.loads((out / "manifests/pseudo-labels.json").read_text())["config"]["threshold"] == 0.5


def test_fusion_options_change_the_layercam_files_only(finished_run, tmp_path, capsys):
    """cams.fusion / cams.peak_quantile re-make the CAMs; LayerCAM's files follow them, the
    baselines' files come out byte for byte as the paper's settings wrote them."""
    out = copy_run(finished_run, tmp_path)
    root = Path(json.loads((out / "results.json").read_text())["data_root"])
    config = tiny_config(tmp_path / "pipeline.yaml", root, out, cams={"fusion": "mean", "peak_quantile": 0.95})
    before = {str(p.relative_to(out)): p.read_bytes() for p in (out / "cams").rglob("*.npz")}
    assert cli_main(["run", "-c", str(config), "--until", "cams"]) == 0
    assert "] cams: running" in capsys.readouterr().out
    after = {str(p.relative_to(out)): p.read_bytes() for p in (out / "cams").rglob("*.npz")}
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before if not k.startswith("cams/layercam/"))
    changed = 0
    for path in sorted((out / "cams/layercam").glob("*.npz")):
        with np.load(path) as saved:
            layers = [saved[k].astype(np.float32) for k in ("stage3", "stage4", "stage5")]
            expected = (np.tanh(2 * layers[0]) + layers[1] + layers[2]) / 3
            np.testing.assert_allclose(saved["cams"].astype(np.float32), expected, atol=2e-3)
        changed += after[f"cams/layercam/{path.name}"] != before[f"cams/layercam/{path.name}"]
    assert changed > 0


def test_thresholds_from_the_seed_sweep_and_an_ignore_band(finished_run, tmp_path, capsys):
    """pseudo.threshold_from_seeds: each CAM folder's pseudo-labels use its best seed threshold of
    this run's eval-cams; pseudo.ignore_below leaves the band above it at 255, and the results
    table reports the share labelled and the mIoU on it."""
    out = copy_run(finished_run, tmp_path)
    root = Path(json.loads((out / "results.json").read_text())["data_root"])
    config = tiny_config(tmp_path / "pipeline.yaml", root, out, eval_cams={"thresholds": "0.1,0.2"},
                         pseudo={"threshold_from_seeds": True, "ignore_below": 0.6})
    assert cli_main(["run", "-c", str(config), "--until", "eval-pseudo"]) == 0
    printed = capsys.readouterr().out
    seeds = json.loads((out / "manifests/eval-cams.json").read_text())["results"]
    used = json.loads((out / "manifests/pseudo-labels.json").read_text())["thresholds"]
    assert used == {"gradcam": seeds["Grad-CAM stage5"]["best_threshold"], "gradcampp": seeds["Grad-CAM++ stage5"]["best_threshold"],
                    "layercam": seeds["LayerCAM stages 3-5 fused"]["best_threshold"]}
    assert all(t in (0.1, 0.2, 0.3) for t in used.values())  # 0.3 is always part of the sweep
    pseudo = json.loads((out / "manifests/eval-pseudo.json").read_text())["results"]["LayerCAM stages 3-5 fused"]
    assert 0 < pseudo["labelled_share"] < 1 and "% of the pixels; mIoU on them" in printed
    assert any((np.asarray(Image.open(p)) == 255).any() for p in (out / "pseudo/layercam").glob("*.png"))


def test_failing_stage_is_named_and_keeps_earlier_outputs(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    root = Path(json.loads((out / "results.json").read_text())["data_root"])
    broken = sorted((out / "cams/layercam").glob("*.npz"))[0]
    broken.write_bytes(b"not an npz")
    config = tiny_config(tmp_path / "pipeline.yaml", root, out, pseudo={"threshold": 0.4})
    before = snapshot(out)
    assert cli_main(["run", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "stage 'pseudo-labels' failed" in err and broken.stem in err
    after = snapshot(out)
    assert all(after.get(k) == before[k] for k in before if k.startswith(("cams/", "classifier/", "manifests/cams")))
    assert json.loads((out / "manifests/pseudo-labels.json").read_text())["finished"] is False


def test_ignore_band_is_checked_against_the_threshold_that_will_be_used():
    """With threshold_from_seeds the constant pseudo.threshold is replaced, so a band below it is
    fine at load time (the pseudo-labels step checks it against each folder's seed threshold)."""
    from wsss.errors import ConfigError
    from wsss.pipeline.config import PseudoConfig

    assert PseudoConfig(threshold=0.3, threshold_from_seeds=True, ignore_below=0.25).ignore_below == 0.25
    with pytest.raises(ConfigError, match=r"ignore_below must be above the threshold \(0.3\), got 0.25"):
        PseudoConfig(threshold=0.3, ignore_below=0.25)
    with pytest.raises(ConfigError, match=r"above the threshold \(0\)"):
        PseudoConfig(threshold_from_seeds=True, ignore_below=0.0)


def test_png_mode_reaches_the_pseudo_label_and_predict_stages_and_their_hashes(tmp_path, toy_root, monkeypatch):
    """pseudo.png_mode / predict.png_mode go to the stage calls; a changed mode changes the step's
    hash, so `wsss run` starts that step afresh instead of keeping PNGs of the other mode."""
    import wsss.stages.predict
    import wsss.stages.pseudo_labels
    from wsss.errors import ConfigError
    from wsss.pipeline import load_config
    from wsss.pipeline.manifest import digest
    from wsss.pipeline.steps import (
        STEP_BY_NAME,
        Run,
        hashed_payload,
        predict_step,
        pseudo_labels_step,
    )
    from wsss.stages.pseudo_labels import PseudoLabelSummary

    calls = []
    monkeypatch.setattr(wsss.stages.pseudo_labels, "make_pseudo_labels",
                        lambda *args, options, **kwargs: calls.append(("pseudo", options.png_mode)) or PseudoLabelSummary())
    monkeypatch.setattr(wsss.stages.predict, "predict_segmentation", lambda *args, **kwargs: calls.append(("predict", args[3].png_mode)))
    hashes = {}
    for mode in ("palette", "gray"):
        config = load_config(tiny_config(tmp_path / f"{mode}.yaml", toy_root, tmp_path / "out",
                                         pseudo={"png_mode": mode}, predict={"png_mode": mode}))
        assert config.to_dict()["pseudo"]["png_mode"] == config.to_dict()["predict"]["png_mode"] == mode
        run = Run(config, tmp_path / "out", toy_root, quiet=True)
        calls.clear()
        pseudo_labels_step(run)
        predict_step(run)
        assert set(calls) == {("pseudo", mode), ("predict", mode)}
        hashes[mode] = {name: digest(hashed_payload(STEP_BY_NAME[name], run, {"cams": "c", "eval-cams": "e", "refine": "r", "segmenter": "s"}))
                        for name in ("pseudo-labels", "predict")}
    assert all(hashes["palette"][name] != hashes["gray"][name] for name in hashes["gray"])
    for section in ("pseudo", "predict"):
        with pytest.raises(ConfigError, match=f"{section}.png_mode 'grey' unknown; choose from palette, gray"):
            load_config(tiny_config(tmp_path / "bad.yaml", toy_root, tmp_path / "out", **{section: {"png_mode": "grey"}}))


def test_unknown_key_lists_valid_keys(tmp_path, toy_root, capsys):
    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, tmp_path / "out", segmentr={"x": 1})
    assert cli_main(["run", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "segmentr" in err and "valid keys" in err and "segmenter" in err
    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, tmp_path / "out", pseudo={"treshold": 0.3})
    assert cli_main(["run", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "treshold" in err and "threshold" in err
    assert not (tmp_path / "out").exists()


def test_print_config_shows_the_resolved_config_which_loads_again(tmp_path, toy_root, capsys):
    from wsss.pipeline import load_config

    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, tmp_path / "out")
    assert cli_main(["run", "-c", str(config), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["cams"]["batch_size"] == 4 and printed["cams"]["scaled"] == ["stage3"]  # the YAML's value, a default
    assert printed["pseudo"]["compactness"] is None and printed["segmenter"]["model"]["width"] == 0.125
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(printed))
    assert load_config(tmp_path / "resolved.yaml") == load_config(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, expected", [
    ({"cams": {"batch_size": "four"}}, "'cams.batch_size' must be int, got 'four'"),
    ({"cams": {"layers": "stage3"}}, "'cams.layers' must be a list, got 'stage3'"),
    ({"cams": {"baselines": ["scorecam"]}}, "cams.baselines ['scorecam'] unknown"),
    ({"cams": {"fusion": "sum"}}, "cams.fusion 'sum' unknown; choose from max, mean"),
    ({"cams": {"peak_quantile": 0}}, "cams.peak_quantile must be in (0, 1], got 0"),
    ({"predict": {"splits": []}}, "predict.splits must be a non-empty list"),
    ({"pseudo": {"threshold": float("nan")}}, "pseudo.threshold must be in [0, 1], got nan"),
    ({"eval_split": ["train"]}, "'eval_split' must be a single value"),
])
def test_config_values_are_checked_before_any_stage(tmp_path, toy_root, capsys, changes, expected):
    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, tmp_path / "out", **changes)
    assert cli_main(["run", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}: " in err and expected in err, err
    assert not (tmp_path / "out").exists()


def test_training_sections_merge_over_the_stage_yaml_and_the_run_sets_its_paths(tmp_path, toy_root):
    from wsss.pipeline import load_config
    from wsss.pipeline.steps import Run

    out = tmp_path / "out"
    path = tiny_config(tmp_path / "pipeline.yaml", toy_root, out)
    pipeline = yaml.safe_load(path.read_text())
    pipeline["classifier"] = {"config": str(CONFIGS / "classifier.yaml"), "model": {"width": 0.125}, "data.batch_size": 3,
                              "data": {"crop_size": 48, "root": "elsewhere"}, "checkpoint": {"dirpath": "elsewhere"}}
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))  # the dotted key before its section, as a user may write it
    config = Run(load_config(path), out, toy_root).classifier_config()
    stage_yaml = yaml.safe_load((CONFIGS / "classifier.yaml").read_text())
    assert config["data"]["batch_size"] == 3 and config["data"]["crop_size"] == 48  # dotted and nested keys both kept
    assert config["data"]["scale_range"] == stage_yaml["data"]["scale_range"] and config["model"]["width"] == 0.125
    assert config["data"]["root"] == str(toy_root) and config["checkpoint"]["dirpath"] == str(out / "classifier")  # the run's paths win
    assert config["trainer"]["logger"] == {"init_args": {"save_dir": str(out / "logs")}} and "ckpt_path" not in config


def test_killed_during_cams_resumes_with_valid_files(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    root = Path(json.loads((out / "results.json").read_text())["data_root"])
    # A changed CAM option reruns that stage and the later ones; SIGKILL inside the 5th CAM file
    # write, its temporary file complete but not yet renamed.
    config = tiny_config(tmp_path / "pipeline.yaml", root, out, cams={"gamma": 3.0})
    killed = subprocess.run([sys.executable, str(KILL_HARNESS), "*.npz", "5", "written", "--", "run", "-c", str(config)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    # One pass writes every CAM folder's file of an image before the next image's.
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "cams").rglob("*.npz") if not p.name.startswith(".")}
    assert len(finished) == 4
    assert json.loads((out / "manifests/cams.json").read_text())["finished"] is False

    assert cli_main(["run", "-c", str(config)]) == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == finished  # kept, not recomputed
    for path in (out / "cams").rglob("*.npz"):
        with np.load(path) as data:
            assert data["cams"].shape[0] == data["classes"].shape[0]
    for path in list((out / "pseudo").rglob("*.png")) + list((out / "predictions").rglob("*.png")):
        Image.open(path).load()
    assert sorted(p.name for p in (out / "cams/layercam").iterdir()) == sorted([*(f"{i}.npz" for i in ids), RECORD_FILE])  # no temporary file left
    assert json.loads((out / "manifests/cams.json").read_text())["finished"] is True


def test_until_stops_after_the_named_stage(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    root = Path(json.loads((out / "results.json").read_text())["data_root"])
    config = tiny_config(tmp_path / "pipeline.yaml", root, out, pseudo={"threshold": 0.45})
    before = snapshot(out)
    assert cli_main(["run", "-c", str(config), "--until", "eval-pseudo"]) == 0
    printed = capsys.readouterr().out
    assert "] pseudo-labels: running" in printed and "] eval-pseudo: running" in printed
    assert "segmenter" not in printed.split("stopped after")[0].split("eval-pseudo: done")[1]
    assert "stopped after 'eval-pseudo'" in printed and "pseudo-labels" in printed.split("stopped after")[1]
    after = snapshot(out)
    assert after["manifests/segmenter.json"] == before["manifests/segmenter.json"]  # not touched
    assert json.loads((out / "manifests/pseudo-labels.json").read_text())["config"]["threshold"] == 0.45


@pytest.mark.slow
def test_a_ddp_step_inside_wsss_run_runs_that_stage_once(finished_run, tmp_path):
    """`cams.devices: 2` on 2 gloo CPU processes. Lightning's ddp launcher starts the second process
    by re-running `wsss run`'s command line; that process must run the CAM stage alone and exit:
    every step once, each CAM file written once by the two processes together, then one process on."""
    out = copy_run(finished_run, tmp_path)
    root = Path(json.loads((out / "results.json").read_text())["data_root"])
    config = tiny_config(tmp_path / "pipeline.yaml", root, out, cams={"accelerator": "cpu", "devices": 2})
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    # devices are result-neutral: the finished CAMs would be reused, so the step is named to run.
    result = subprocess.run([sys.executable, "-m", "wsss.cli", "run", "-c", str(config), "--from", "cams", "--until", "eval-pseudo"],
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    for stage in ("cams", "eval-cams", "pseudo-labels", "eval-pseudo"):
        assert printed.count(f"] {stage}: running") == 1, printed
    assert printed.count("stopped after 'eval-pseudo'") == 1 and printed.count("wsss run: data") == 1
    assert result.stderr.count("runs step 'cams' alone") == 1, result.stderr[-3000:]  # one other process, for that step only
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    counts = json.loads((out / "manifests/cams.json").read_text())["counts"]
    assert counts == {name: {"written": len(ids), "skipped": 0} for name in ("layercam", "gradcam", "gradcampp")}


@pytest.mark.slow
def test_two_independent_runs_give_identical_outputs(finished_run, toy_root, tmp_path):
    """The same tiny configuration run again in a fresh folder, by another process with another
    hash seed: identical CAMs, byte-identical pseudo-labels and predictions, identical weights."""
    out = tmp_path / "out"
    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, out)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-m", "wsss.cli", "run", "-c", str(config)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for folder, pattern in (("pseudo", "*.png"), ("predictions", "*.png"), ("cams", "*.npz")):
        files = sorted(p.relative_to(finished_run) for p in (finished_run / folder).rglob(pattern))
        assert files and files == sorted(p.relative_to(out) for p in (out / folder).rglob(pattern))
        for name in files:
            if pattern == "*.png":
                assert (out / name).read_bytes() == (finished_run / name).read_bytes(), name
                continue
            with np.load(out / name) as got, np.load(finished_run / name) as expected:
                assert got.files == expected.files
                for key in expected.files:
                    np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{name}: {key}")
    for name in ("classifier/best.ckpt", "segmenter/last.ckpt"):
        got = torch.load(out / name, map_location="cpu", weights_only=True)["state_dict"]
        expected = torch.load(finished_run / name, map_location="cpu", weights_only=True)["state_dict"]
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected), name


@pytest.mark.slow
def test_interrupted_segmenter_stage_resumes_from_its_last_checkpoint(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    root = Path(json.loads((out / "results.json").read_text())["data_root"])
    # A changed segmenter section: that stage reruns, killed right after last.ckpt at step 4 is in place.
    config = tiny_config(tmp_path / "pipeline.yaml", root, out, segmenter={
        "trainer": {"max_steps": 6, "val_check_interval": 6, "log_every_n_steps": 1},
        "last_checkpoint": {"every_n_train_steps": 2}})
    killed = subprocess.run([sys.executable, str(KILL_HARNESS), "*.ckpt", "2", "renamed",
                             "--", "run", "-c", str(config)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = out / "segmenter" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    assert json.loads((out / "manifests/segmenter.json").read_text())["finished"] is False

    assert cli_main(["run", "-c", str(config)]) == 0
    assert "] segmenter: running (resuming)" in capsys.readouterr().out
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    # The resumed run logged steps 4 and 5 only: it continued, it did not train 6 steps again.
    newest = max((out / "logs" / "segmenter").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(newest / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert steps == [4, 5]


def test_demo_runs_the_toy_pipeline_config_and_writes_the_report(finished_run, tmp_path, toy_root, monkeypatch, capsys):
    import wsss.data
    import wsss.pipeline.run

    out = copy_run(finished_run, tmp_path)
    # The demo's own glue on the tiny configuration of this module (every stage already done here).
    monkeypatch.setattr(wsss.data, "resolve_data_root", lambda root: toy_root)
    monkeypatch.setattr(wsss.pipeline.run, "default_toy_config", lambda: tiny_config(tmp_path / "pipeline.yaml", toy_root, out))
    assert cli_main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (up to date)") == len(STAGES) - 1 and "] refine: off" in printed  # refine is opt-in
    assert "LayerCAM stages 3-5 fused" in printed and f"report: {out / 'report' / 'index.html'}" in printed
    assert (out / "report" / "index.html").is_file() and list((out / "report").glob("sheet_*.png"))


def test_shipped_pipeline_configs_load_and_point_at_their_stage_configs():
    from wsss.pipeline import load_config

    for path in (CONFIGS / "pipeline.yaml", *CONFIGS.parent.glob("pipeline*.yaml"), *(CONFIGS.parent / "voc_mini").glob("pipeline*.yaml")):
        config = load_config(path)
        assert config.classifier.config.is_file() and config.segmenter.config.is_file()
    for folder in (CONFIGS.parent, CONFIGS.parent / "voc_mini"):
        # The beyond-the-paper presets reuse their paper preset's classifier and segmenter settings:
        # only the CAM fusion and stage 3 differ, so one classifier serves every row of the ablation.
        paper, best = (yaml.safe_load((folder / name).read_text()) for name in ("pipeline.yaml", "pipeline_best.yaml"))
        assert {key for key in paper.keys() | best.keys() if paper.get(key) != best.get(key)} == {"out", "cams", "pseudo"}
        assert best["cams"] == {**paper["cams"], "peak_quantile": 0.99, "fusion": "mean"}
        assert best["pseudo"] == {**paper["pseudo"], "threshold_from_seeds": True}
    toy = load_config(CONFIGS / "pipeline.yaml")
    assert toy.segmenter.overrides["model"]["weights"] == "classifier" and toy.cam_split == "train_aug"


def test_voc_mini_configs_reach_every_stage_on_a_voc_layout_with_irns_label_table(tmp_path, capsys):
    """configs/voc_mini/ as shipped (frozen stages, bf16, the paper's CAM and pseudo-label settings)
    on a tiny VOC folder laid out like ../shared/data/voc12_mini: no Annotations/, IRN's
    cls_labels.npy (protocol 2) at the root; only the network width, sizes and steps are shrunk."""
    from test_io import save_npy_protocol2

    from wsss.data.toy import make_toy_voc
    from wsss.data.voc import ImageLabels, VOCLayout

    root = make_toy_voc(tmp_path / "VOC2012", seed=3, num_train=10, num_val=4, num_train_subset=10)
    layout = VOCLayout(root)
    from_masks = ImageLabels(layout, "masks")
    table = {i: from_masks(i) for s in ("train", "val") for i in layout.read_ids(s)}
    image_id = layout.read_ids("train")[0]
    table[image_id] = np.eye(20, dtype=np.float32)[19]  # tvmonitor: in no toy mask, so only the table says so
    shutil.rmtree(root / "Annotations")
    save_npy_protocol2(root / "cls_labels.npy", table)
    voc_mini = CONFIGS.parent / "voc_mini"
    config = yaml.safe_load((voc_mini / "pipeline.yaml").read_text())
    tiny = {"model": {"weights": "none", "width": 0.125}}
    config.update(
        data_root=str(root), out=str(tmp_path / "out"),
        classifier={**config["classifier"], **tiny, "config": str(voc_mini / "classifier.yaml"),
                    "trainer": {"max_epochs": 1}, "data": {"crop_size": 64, "batch_size": 4, "num_workers": 0}},
        segmenter={**config["segmenter"], **tiny, "config": str(voc_mini / "segmenter.yaml"),
                   "trainer": {"max_steps": 2}, "data": {"crop_size": 33, "batch_size": 2, "num_workers": 0}},
    )
    config["cams"]["num_workers"] = config["predict"]["num_workers"] = 0
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["run", "-c", str(path)]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    rows = {(r["stage"], r["method"], r["split"]) for r in results["rows"]}
    for method in ("Grad-CAM stage5", "Grad-CAM++ stage5", "LayerCAM stage5", "LayerCAM stage4", "LayerCAM stage3",
                   "LayerCAM stages 4-5 fused", "LayerCAM stages 3-5 fused"):
        assert ("CAM seeds", method, "train") in rows, method
    for method in ("Grad-CAM stage5", "Grad-CAM++ stage5", "LayerCAM stages 3-5 fused"):
        assert ("pseudo-labels", method, "train") in rows, method
    assert [r["split"] for r in results["rows"] if r["stage"] == "segmenter"] == ["val", "train"]  # predict.splits
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["train", "val"]
    classifier = torch.load(out / "classifier" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert classifier["frozen_stages"] == 4
    with np.load(out / "cams" / "layercam" / f"{image_id}.npz") as cams:  # labels came from the root's table
        assert cams["classes"].tolist() == [20]


def test_an_eval_split_outside_the_cam_split_is_refused_before_any_step(toy_root, tmp_path, capsys):
    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, tmp_path / "out", eval_split="val")
    assert cli_main(["run", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "eval_split 'val' has 8 ids that cam_split 'train' has not" in err
    assert not (tmp_path / "out" / "classifier").exists()  # before the classifier, not after the CAMs


def test_the_classifier_hash_follows_its_own_image_label_source(toy_root, tmp_path):
    from wsss.pipeline.config import load_config
    from wsss.pipeline.manifest import digest
    from wsss.pipeline.steps import STEP_BY_NAME, Run, hashed_payload

    hashes = {}
    for source in ("auto", "annotations", "masks"):
        config = load_config(tiny_config(tmp_path / f"{source}.yaml", toy_root, tmp_path / "out", classifier={
            "config": str(CONFIGS / "classifier.yaml"), "model": {"width": 0.125}, "trainer": {"max_epochs": 1},
            "data": {"crop_size": 64, "batch_size": 8, "num_workers": 0, "labels": source}}))
        run = Run(config, tmp_path / "out", toy_root, quiet=True)
        hashes[source] = digest(hashed_payload(STEP_BY_NAME["classifier"], run, {}))
    # The toy has Annotations/: auto is annotations (the same hash as before this option was hashed); masks trains on other labels.
    assert hashes["auto"] == hashes["annotations"] != hashes["masks"]


def test_the_predict_step_says_when_it_predicts_with_the_last_checkpoint(toy_root, tmp_path, monkeypatch, capsys):
    import wsss.stages.predict
    from wsss.pipeline.config import load_config
    from wsss.pipeline.steps import Run, predict_step

    used = []
    monkeypatch.setattr(wsss.stages.predict, "predict_segmentation", lambda checkpoint, *args, **kwargs: used.append(Path(checkpoint).name))
    run = Run(load_config(tiny_config(tmp_path / "p.yaml", toy_root, tmp_path / "out")), tmp_path / "out", toy_root)
    (tmp_path / "out" / "segmenter").mkdir(parents=True)
    (tmp_path / "out" / "segmenter" / "last.ckpt").write_bytes(b"")
    predict_step(run)
    assert set(used) == {"last.ckpt"} and "no best.ckpt" in capsys.readouterr().out  # not silently
    (tmp_path / "out" / "segmenter" / "best.ckpt").write_bytes(b"")
    used.clear()
    predict_step(run)
    assert set(used) == {"best.ckpt"}
