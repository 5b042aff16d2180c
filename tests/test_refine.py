"""`wsss refine` end to end on the toy data through the CLI, its refusals, and the run's refine step."""
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
from wsss.formats.cams import read_cams, write_cams
from wsss.formats.label_png import read_label_png
from wsss.records import RECORD_FILE, identity_digest, read_record

FAST = ["--max-steps", "3", "--batch-size", "2", "--crop-size", "64", "--n-segments", "50", "--num-workers", "0", "--iterations", "8",
        "--embedding", "16", "--accelerator", "cpu"]


def save_classifier(path: Path, seed: int) -> Path:
    from wsss.systems.classifier import ClassifierSystem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        system = ClassifierSystem(weights="none", width=0.125)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def made(toy_root, tmp_path_factory):
    """A classifier and its CAM folder on the toy `train` split."""
    base = tmp_path_factory.mktemp("refine")
    checkpoint = save_classifier(base / "cls.ckpt", 0)
    assert cli(["cams", "--checkpoint", str(checkpoint), "--data-root", str(toy_root), "--split", "train", "--out", str(base / "cams"),
                "--num-workers", "0", "--accelerator", "cpu"]) == 0
    return checkpoint, base / "cams"


def refine(toy_root, checkpoint, cams, out, *extra) -> int:
    return cli(["refine", "--checkpoint", str(checkpoint), "--cams", str(cams), "--data-root", str(toy_root), "--split", "train",
                "--out", str(out), *FAST, *extra])


def test_refine_writes_seeds_refined_cams_and_labels_that_the_other_stages_read(toy_root, made, tmp_path, capsys):
    checkpoint, cams = made
    out = tmp_path / "refined"
    assert refine(toy_root, checkpoint, cams, out) == 0
    printed = capsys.readouterr().out
    assert "affinity net 3 steps" in printed and "12 refined" in printed
    ids = VOCLayout(toy_root).read_ids("train")
    for image_id in ids:
        maps, classes = read_cams(out / "cams" / f"{image_id}.npz")
        seed_maps, seed_classes = read_cams(cams / f"{image_id}.npz")
        assert classes.tolist() == seed_classes.tolist() and maps.shape == seed_maps.shape
        assert maps.size == 0 or maps.max() == 0 or abs(float(maps.max()) - 1) < 1e-3  # IRN's one global maximum: 1
        labels = read_label_png(out / "labels" / f"{image_id}.png")
        assert labels.shape == maps.shape[1:] and set(np.unique(labels)) <= {0, *classes.tolist()}
        assert set(np.unique(read_label_png(out / "seeds" / f"{image_id}.png"))) <= {0, 255, *classes.tolist()}
    record = read_record(out / "cams")
    assert record["stage"] == "refine" and record["inputs"]["classifier"].startswith("sha256:") and record["params"]["beta"] == 10.0
    gt = VOCLayout(toy_root).mask_dir
    assert cli(["eval-cams", "--cams", str(out / "cams"), "--gt", str(gt), "--thresholds", "0.2,0.4"]) == 0
    assert cli(["pseudo-labels", "--data-root", str(toy_root), "--cams", str(out / "cams"), "--out", str(tmp_path / "pseudo"),
                "--split", "train", "--workers", "1", "--n-segments", "50"]) == 0
    # Resumed with the same settings: nothing trained or written again.
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cams").glob("*.npz")}
    assert refine(toy_root, checkpoint, cams, out) == 0
    assert "0 refined, 12 already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "cams").glob("*.npz")} == stamps
    # Other settings into the same folder: refused, naming them.
    assert refine(toy_root, checkpoint, cams, out, "--beta", "8") == 2
    assert "beta: 10.0 -> 8.0" in capsys.readouterr().err


def test_refine_refuses_missing_ids_another_classifier_and_a_walk_too_large(toy_root, made, tmp_path, capsys):
    checkpoint, cams = made
    partial = tmp_path / "partial"
    shutil.copytree(cams, partial)
    ids = VOCLayout(toy_root).read_ids("train")
    for image_id in ids[:2]:
        (partial / f"{image_id}.npz").unlink()
    assert refine(toy_root, checkpoint, partial, tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "2 of 12 listed ids have no CAM file" in err and ids[0] in err
    other = save_classifier(tmp_path / "other.ckpt", 1)
    assert refine(toy_root, other, cams, tmp_path / "b") == 2
    assert "made by another classifier" in capsys.readouterr().err
    assert refine(toy_root, checkpoint, cams, tmp_path / "c", "--stride", "4", "--radius", "40", "--max-memory-mb", "1") == 2
    err = capsys.readouterr().err
    assert "needs" in err and "MiB, above max_memory_mb 1" in err
    for name in ("a", "b", "c"):
        assert not (tmp_path / name / "seeds").exists()  # refused before any work


def test_overwrite_retrains_the_net_and_a_save_cut_short_leaves_no_checkpoint(toy_root, made, tmp_path, monkeypatch, capsys):
    import wsss.stages.refine as stage

    checkpoint, cams = made
    out = tmp_path / "out"
    assert refine(toy_root, checkpoint, cams, out) == 0
    finished = out / "affinity" / "finished.ckpt"
    before = finished.stat().st_mtime_ns
    capsys.readouterr()
    assert refine(toy_root, checkpoint, cams, out, "--overwrite") == 0
    assert finished.stat().st_mtime_ns != before  # "redo everything" trains the net again
    assert "12 refined, 0 already done" in capsys.readouterr().out

    real_save = stage.torch.save

    def cut_short(payload, path, *args, **kwargs):  # Lightning's own checkpoints are saved as usual
        if "finished" not in str(path):
            return real_save(payload, path, *args, **kwargs)
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    other = tmp_path / "killed"
    monkeypatch.setattr(stage.torch, "save", cut_short)
    assert refine(toy_root, checkpoint, cams, other) == 130  # interrupted mid-save
    assert not (other / "affinity" / "finished.ckpt").exists()  # no half file for the next run to trust


def test_crf_seeds_without_pydensecrf_are_refused_before_any_work(toy_root, made, tmp_path, monkeypatch, capsys):
    import wsss.stages.refine as stage

    checkpoint, cams = made
    monkeypatch.setattr(stage, "crf_available", lambda: False)
    assert refine(toy_root, checkpoint, cams, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "pip install 'wsss[crf]'" in err and "--seeds superpixel" in err
    assert not (tmp_path / "out").exists()
    assert refine(toy_root, checkpoint, cams, tmp_path / "sp", "--seeds", "superpixel") == 0  # the vote needs no CRF


def test_psa_embedding_walks_a_background_map_and_labels_by_its_argmax(toy_root, made, tmp_path):
    checkpoint, cams = made
    out = tmp_path / "psa"
    assert refine(toy_root, checkpoint, cams, out, "--kind", "embedding") == 0
    record = read_record(out / "cams")
    assert record["params"]["stride"] == 8 and record["params"]["beta"] == 8.0 and record["params"]["train_radius"] == 5
    assert read_record(out / "seeds")["params"]["seeds"] == "crf"
    for image_id in VOCLayout(toy_root).read_ids("train"):
        maps, classes = read_cams(out / "cams" / f"{image_id}.npz")
        labels = read_label_png(out / "labels" / f"{image_id}.png")
        assert set(np.unique(labels)) <= {0, *classes.tolist()}


def test_the_walk_memory_counts_every_class_of_the_label_set(toy_root):
    import dataclasses

    from wsss.stages.refine import RefineOptions, check_walk_memory

    layout = VOCLayout(toy_root)
    ids = layout.read_ids("train")
    coco_like = type("Layout", (), {"num_classes": 80, "image_path": layout.image_path})()
    options = RefineOptions()
    voc, coco = check_walk_memory(layout, ids, options), check_walk_memory(coco_like, ids, options)
    assert coco > voc  # 80 maps, not 20
    with pytest.raises(Exception, match="above max_memory_mb"):
        check_walk_memory(coco_like, ids, dataclasses.replace(options, max_memory_mb=int(coco) if coco >= 1 else 1, radius=9))


def test_an_image_without_confident_foreground_is_counted_not_fatal(toy_root, made, tmp_path, capsys):
    checkpoint, cams = made
    faint = tmp_path / "faint"
    shutil.copytree(cams, faint)
    first = VOCLayout(toy_root).read_ids("train")[0]
    maps, classes = read_cams(faint / f"{first}.npz")
    write_cams(faint / f"{first}.npz", classes=classes, cams=(maps * 0.01).astype(np.float16))
    (faint / RECORD_FILE).unlink()  # edited by hand: no longer what the record says
    assert refine(toy_root, checkpoint, faint, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "(1 without confident foreground" in printed and first in printed
    assert not (read_label_png(tmp_path / "out" / "seeds" / f"{first}.png") % 255).any()


def test_wsss_run_refines_between_the_cams_and_the_pseudo_labels(toy_root, tmp_path, capsys):
    from test_pipeline import tiny_config

    refine_section = {"enabled": True, "thresholds_from_seeds": True, "max_steps": 2, "batch_size": 2, "crop_size": 64, "n_segments": 50,
                      "num_workers": 0, "iterations": 8, "embedding": 16, "accelerator": "cpu"}
    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, tmp_path / "out", refine=refine_section)
    assert cli(["run", "-c", str(config), "--until", "eval-pseudo"]) == 0
    printed = capsys.readouterr().out
    assert "] refine: running" in printed and "refined LayerCAM stages 3-5 fused: mIoU" in printed
    out = tmp_path / "out"
    manifest = json.loads((out / "manifests" / "refine.json").read_text())
    row = manifest["results"]["LayerCAM stages 3-5 fused + affinity RW"]
    best = json.loads((out / "manifests" / "eval-cams.json").read_text())["results"]["LayerCAM stages 3-5 fused"]["best_threshold"]
    assert row["seed_thresholds"] == [pytest.approx(0.25 * best), pytest.approx(min(0.95, 2 * best))]
    refined_identity = identity_digest(read_record(out / "refined" / "layercam" / "cams"))
    assert read_record(out / "pseudo" / "layercam")["inputs"]["cams"] == f"record:{refined_identity}"  # made from the refined maps
    assert read_record(out / "pseudo" / "gradcam")["sources"]["cams"].endswith("cams/gradcam")  # not refined
    pseudo = json.loads((out / "manifests" / "eval-pseudo.json").read_text())["results"]
    assert "LayerCAM stages 3-5 fused + affinity RW" in pseudo and "Grad-CAM stage5" in pseudo
    # The report shows the refined map next to the fused map it came from.
    from PIL import Image

    from wsss.report import DEFAULT_TILE, NUM_COLUMNS, sheet_size, write_report

    index = write_report(out, toy_root, max_images=2)
    with Image.open(index.parent / "sheet_00.png") as sheet:
        assert sheet.size == sheet_size(2, DEFAULT_TILE, NUM_COLUMNS + 1)
    assert "LayerCAM fused, LayerCAM + RW, pseudo-label" in index.read_text()


def test_the_refine_step_off_changes_no_other_step(toy_root, tmp_path):
    """The paper presets leave refine off: every step's hash is the same as with the section
    absent, and the step runs nothing."""
    from test_pipeline import CONFIGS

    from wsss.pipeline.config import load_config
    from wsss.pipeline.manifest import digest
    from wsss.pipeline.steps import STEPS, Run, hashed_payload

    hashes = []
    for refine_section in (None, {"enabled": False, "beta": 10.0}):
        raw = yaml.safe_load((CONFIGS / "pipeline.yaml").read_text())
        raw["classifier"]["config"] = str(CONFIGS / "classifier.yaml")
        raw["segmenter"]["config"] = str(CONFIGS / "segmenter.yaml")
        raw["data_root"] = str(toy_root)
        if refine_section:
            raw["refine"] = refine_section
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
        run = Run(load_config(tmp_path / "p.yaml"), tmp_path / "out", toy_root, quiet=True)
        done: dict[str, str] = {}
        for step in STEPS:
            done[step.name] = digest(hashed_payload(step, run, done))
        hashes.append(done)
    assert hashes[0] == hashes[1]


def test_the_ablation_scripts_reference_row_is_the_stages_own_labels(toy_root, made, tmp_path, capsys):
    import importlib.util

    from wsss.stages.evaluate import evaluate_labels

    checkpoint, cams = made
    out = tmp_path / "refined"
    assert refine(toy_root, checkpoint, cams, out) == 0
    path = Path(__file__).resolve().parents[1] / "scripts" / "refine_ablation.py"
    spec = importlib.util.spec_from_file_location("refine_ablation", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    assert script.main(["--refined", str(out), "--cams", str(cams), "--checkpoint", str(checkpoint), "--data-root", str(toy_root),
                        "--split", "train", "--limit", "12", "--variant", "reference", "--variant", "thin:thin_path=1,edge_product=0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| reference") or line.startswith("| thin")]
    ids = VOCLayout(toy_root).read_ids("train")
    own = evaluate_labels(out / "labels", VOCLayout(toy_root).mask_dir_for(ids), ids)
    assert float(rows[0].split("|")[2]) == pytest.approx(100 * own.miou, abs=0.05)  # the same walk as the stage's, to rounding
    assert len(rows) == 2
    with pytest.raises(SystemExit, match="not a walk option"):
        script.parse_variant("x:stride=8")


def test_wsss_run_refuses_crf_seeds_without_pydensecrf_before_any_step(toy_root, tmp_path, monkeypatch, capsys):
    import wsss.crf
    from test_pipeline import tiny_config

    monkeypatch.setattr(wsss.crf, "crf_available", lambda: False)
    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, tmp_path / "out", refine={"enabled": True})
    assert cli(["run", "-c", str(config)]) == 2
    assert "refine.seeds: crf: dense CRF needs pydensecrf" in capsys.readouterr().err
    assert not (tmp_path / "out" / "classifier").exists()
