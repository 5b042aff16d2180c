"""The command line users expect: `--config FILE` on every stage command (flags win), dotted
overrides of any pipeline key on `wsss run` (shown by --print-config, changing only that step)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import tiny_config
from wsss.cli import main as cli


def capture(monkeypatch, module, function: str) -> dict:
    """Replace ``module.function`` by a recorder of its keyword arguments."""
    seen: dict = {}

    def record(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise SystemExit(0)

    monkeypatch.setattr(module, function, record)
    return seen


def test_pseudo_labels_reads_its_options_from_a_config_file_and_flags_win(tmp_path, monkeypatch):
    import wsss.stages.pseudo_labels as stage

    seen = capture(monkeypatch, stage, "make_pseudo_labels")
    options = tmp_path / "pseudo.yaml"
    options.write_text(yaml.safe_dump({"data_root": "toy", "cams": "cams/layercam", "out": "pseudo", "threshold": 0.4,
                                       "crf": False, "n_segments": 300, "workers": 1}))
    with pytest.raises(SystemExit):
        cli(["pseudo-labels", "--config", str(options), "--n-segments", "500"])
    assert seen["options"].threshold == 0.4 and seen["options"].workers == 1  # from the file
    assert seen["options"].n_segments == 500  # the flag wins
    assert seen["args"] == ("toy", Path("cams/layercam"), Path("pseudo"))  # required flags given by the file


@pytest.mark.parametrize("command, module, function, options", [
    ("cams", "wsss.stages.cams", "make_cams", {"checkpoint": "c.ckpt", "data_root": "toy", "out": "o", "fusion": "mean",
                                               "layers": ["stage4", "stage5"], "scaled": ["stage4"], "scales": [1.0, 0.5], "flip": True}),
    ("refine", "wsss.stages.refine", "make_refined_cams", {"checkpoint": "c.ckpt", "data_root": "toy", "cams": "x", "out": "o",
                                                           "beta": 8, "radius": 4}),
    ("predict-seg", "wsss.stages.predict", "predict_segmentation", {"checkpoint": "s.ckpt", "data_root": "toy", "out": "o",
                                                                    "scales": [1.0], "png_mode": "gray"}),
])
def test_every_stage_command_takes_a_config_file(tmp_path, monkeypatch, command, module, function, options):
    import importlib

    stage = importlib.import_module(module)
    seen = capture(monkeypatch, stage, function)
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(options))
    with pytest.raises(SystemExit):
        cli([command, "--config", str(path)])
    values = {}
    seen_args = seen.pop("args")
    for value in [*seen_args, *seen.values()]:
        if dataclasses.is_dataclass(value):
            values.update(dataclasses.asdict(value))
        elif isinstance(value, dict):  # make_cams: {out: variant}
            for variant in value.values():
                values.update(dataclasses.asdict(variant) if dataclasses.is_dataclass(variant) else {})
    checked = [key for key in options if key in values]
    assert len(checked) >= 2, (checked, values)  # the file's option values reached the stage function
    for key in checked:
        expected = options[key]
        assert values[key] == (tuple(expected) if isinstance(expected, list) else expected), key
    assert str(options["data_root"]) in map(str, seen_args)


def test_config_file_errors_name_the_file_and_the_key(tmp_path, capsys):
    path = tmp_path / "options.yaml"
    path.write_text("treshold: 0.4\n")
    assert cli(["pseudo-labels", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'treshold' (did you mean 'threshold'?)" in err
    path.write_text("threshold: high\ndata_root: toy\ncams: c\nout: o\n")
    assert cli(["pseudo-labels", "--config", str(path)]) == 2
    assert "threshold' must be float, got 'high'" in capsys.readouterr().err
    path.write_text("threshold: 1.5\ndata_root: toy\ncams: c\nout: o\n")
    assert cli(["pseudo-labels", "--config", str(path)]) == 2
    assert "--threshold must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_run_takes_dotted_overrides_shown_by_print_config(tmp_path, toy_root, capsys):
    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, tmp_path / "out")
    assert cli(["run", "-c", str(config), "--print-config", "--cams.fusion", "mean", "--pseudo.threshold=0.25",
                "--segmenter.trainer.max_steps", "7", "--refine.variants", "[layercam, gradcam]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["cams"]["fusion"] == "mean" and printed["pseudo"]["threshold"] == 0.25
    assert printed["segmenter"]["trainer.max_steps"] == 7 and printed["refine"]["variants"] == ["layercam", "gradcam"]
    assert cli(["run", "-c", str(config), "--print-config", "--cam.fusion", "mean"]) == 2
    assert "'cam' (did you mean 'cams'?)" in capsys.readouterr().err
    assert cli(["run", "-c", str(config), "--print-config", "--cams.fusion", "avg"]) == 2
    assert "cams.fusion 'avg' unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["run", "-c", str(config), "stray"])


def test_a_dotted_override_changes_exactly_its_steps_section(tmp_path, toy_root):
    from wsss.pipeline import load_config
    from wsss.pipeline.run import dotted_overrides
    from wsss.pipeline.steps import STEPS, Run, hashed_payload

    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, tmp_path / "out")
    fake = {step.name: "h" for step in STEPS}  # the steps' own payloads, their inputs held fixed

    def payloads(argv):
        import argparse

        loaded = load_config(config, dotted=dotted_overrides(argparse.ArgumentParser(), argv))
        run = Run(loaded, tmp_path / "out", toy_root, quiet=True)
        return {step.name: hashed_payload(step, run, fake) for step in STEPS}

    base = payloads([])
    for argv, changed in ((["--pseudo.threshold", "0.45"], {"pseudo-labels"}), (["--eval_cams.thresholds", "0:0.5:0.25"], {"eval-cams"}),
                          (["--segmenter.trainer.max_steps", "3"], {"segmenter"})):
        after = payloads(argv)
        assert {name for name in base if after[name] != base[name]} == changed, argv


def test_a_file_that_is_not_a_torch_checkpoint_is_named_as_such(tmp_path):
    from wsss.errors import WeightsError
    from wsss.formats.torch_files import read_checkpoint

    text = tmp_path / "notes.ckpt"
    text.write_text("epoch=3 val/mAP=0.74\n")
    with pytest.raises(WeightsError, match=r"notes.ckpt is not a torch file \(checkpoint\).*starts with b'epoc'"):
        read_checkpoint(text)
    import torch

    real = tmp_path / "real.ckpt"
    torch.save({"state_dict": {}}, real)
    assert read_checkpoint(real) == {"state_dict": {}}
    legacy = tmp_path / "legacy.ckpt"  # torch < 1.6 wrote plain pickles
    torch.save({"state_dict": {}}, legacy, _use_new_zipfile_serialization=False)
    assert read_checkpoint(legacy) == {"state_dict": {}}


def test_a_gt_folder_without_pngs_says_what_it_holds(tmp_path, toy_root, capsys):
    assert cli(["evaluate", "--pred", str(tmp_path), "--gt", str(toy_root / "JPEGImages")]) == 2
    err = capsys.readouterr().err
    assert "no png files in" in err and ".jpg files (photos, not masks: point at the masks folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["evaluate", "--pred", str(tmp_path), "--gt", str(empty)]) == 2
    assert "it is empty" in capsys.readouterr().err
