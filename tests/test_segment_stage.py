"""Stage 4 (segmenter): training system, geometry, train-seg / predict-seg through the real CLI."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.cli import main as wsss_main
from wsss.data.voc import VOCLayout
from wsss.formats.label_png import read_label_png, write_label_png
from wsss.crf import crf_available
from wsss.segmentation import aligned_size, image_logits, image_probabilities, nearest_labels
from wsss.systems.segmenter import SegmenterSystem

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = REPO / "configs" / "toy" / "segmenter.yaml"
WIDTH = "0.125"
NUM_VAL = 3  # validate/predict on the first 3 val images only: full-size inference is the slow part


def val_list(root: Path, tmp: Path) -> Path:
    """A list file with the first NUM_VAL val ids (splits may be given as list files)."""
    path = tmp / "val_small.txt"
    path.write_text("\n".join(VOCLayout(root).read_ids("val")[:NUM_VAL]) + "\n")
    return path


def train_args(root: Path, tmp: Path, labels: str, max_steps: int = 2, *extra: str) -> list[str]:
    """train-seg on the toy config, shrunk: tiny width and crop, validation after every 2 steps,
    every output (checkpoints, logs, saved config) inside ``tmp``."""
    return [
        "train-seg", "-c", str(TOY_CONFIG),
        "--data.root", str(root), "--data.train_split", "train", "--data.train_labels", labels,
        "--data.val_split", str(val_list(root, tmp)),
        "--data.crop_size", "33", "--data.batch_size", "4", "--data.num_workers", "0",
        "--model.width", WIDTH,
        "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "2",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--checkpoint.dirpath", str(tmp / "ckpt"), *extra,
    ]


def copy_labels(toy_root: Path, dest: Path, value_fn=None) -> Path:
    """A pseudo-label folder: copies of the GT masks (optionally altered by ``value_fn``)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in VOCLayout(toy_root).mask_dir.glob("*.png"):
        labels = read_label_png(path)
        write_label_png(dest / path.name, value_fn(labels) if value_fn else labels)
    return dest


@pytest.fixture(scope="module")
def trained(toy_root, tmp_path_factory):
    """2 training steps on a pseudo-label folder (copies of GT); returns the run folder."""
    tmp = tmp_path_factory.mktemp("seg_run")
    pseudo = copy_labels(toy_root, tmp / "pseudo")
    assert wsss_main(train_args(toy_root, tmp, str(pseudo))) == 0
    return tmp


# ----------------------------------------------------------------------------- pure pieces
def test_aligned_size_and_nearest_labels_follow_the_8k_plus_1_grid():
    assert [aligned_size(n) for n in (1, 9, 10, 320, 321, 322)] == [1, 9, 17, 321, 321, 329]
    mask = torch.randint(0, 21, (2, 321, 321))
    assert torch.equal(nearest_labels(mask, (41, 41)), mask[:, ::8, ::8])


@pytest.mark.parametrize("size", [(33, 33), (50, 37), (8, 13)])
def test_image_logits_cover_any_image_size(size):
    model = SegmenterSystem(weights="none", width=0.0625).eval()
    with torch.no_grad():
        logits = image_logits(model, torch.randn(2, 3, *size))
        probs = image_probabilities(model, torch.randn(3, *size), scales=(0.5, 1.0), flip=True)
    assert logits.shape == (2, 21, *size) and torch.isfinite(logits).all()
    assert probs.shape == (21, *size)
    assert torch.allclose(probs.sum(0), torch.ones(size), atol=1e-5)


def test_flip_averages_each_flipped_pass_mirrored_back():
    """Test-time flip: the probabilities of the mirrored image, mirrored back, averaged with the plain
    pass, at every scale (a model that is not mirror-symmetric tells a missing mirror-back)."""
    torch.manual_seed(0)
    model = SegmenterSystem(weights="none", width=0.0625).eval()
    model.model.fc8.weight.data.normal_(std=1.0)  # confident, position-dependent outputs
    image = torch.randn(3, 37, 50)
    with torch.no_grad():
        passes = [image_probabilities(model, view, scales=(scale,)) for scale in (0.5, 1.0) for view in (image, image.flip(-1))]
        passes = [p if n % 2 == 0 else p.flip(-1) for n, p in enumerate(passes)]
        flipped = image_probabilities(model, image, flip=True)
        both = image_probabilities(model, image, scales=(0.5, 1.0), flip=True)
    assert (passes[2] - passes[3]).abs().max() > 0.05, "a mirror-symmetric model could not tell"
    torch.testing.assert_close(flipped, (passes[2] + passes[3]) / 2)
    torch.testing.assert_close(both, sum(passes) / 4)


@pytest.mark.parametrize("loss_at", ["image", "logits"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(loss_at):
    torch.manual_seed(0)
    system = SegmenterSystem(weights="none", width=0.125, loss_at=loss_at)
    images = torch.randn(2, 3, 33, 33)
    masks = torch.zeros(2, 33, 33, dtype=torch.long)
    masks[:, :, 17:] = 7  # right half: class 7, a learnable pattern given the image
    images[:, :, :, 17:] += 1.0
    masks[:, 0] = 255  # ignored row
    optimizer = torch.optim.SGD(system.model.optimizer_param_groups(1e-2, 5e-4), lr=1e-2, momentum=0.9)

    def loss() -> torch.Tensor:
        return system.loss(system(images), masks)

    system.eval()
    with torch.no_grad():
        before = loss().item()
    system.train()
    for _ in range(5):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert all(p.grad is not None for p in system.parameters())
    system.eval()
    with torch.no_grad():
        after = loss().item()
    assert np.isfinite(after) and after < before - 0.05, (before, after)


def test_new_layers_first_holds_the_pretrained_layers_still_while_the_new_ones_learn(tmp_path):
    """Through a real Trainer: for ``new_layers_first`` steps the trunk (pretrained) does not move while
    fc6/fc7/fc8 (random under a trunk without them) do; afterwards the trunk learns too."""
    import pytorch_lightning as pl

    from wsss.models.vgg import vgg16_features

    path = tmp_path / "cls.ckpt"  # a plain pretrained trunk without fc6/fc7: the stage-1 classifier's
    torch.save({"state_dict": {f"model.features.{k}": v for k, v in vgg16_features(0.125).state_dict().items()}}, path)
    images = torch.randn(2, 3, 33, 33)
    masks = torch.randint(0, 21, (2, 33, 33))
    loader = torch.utils.data.DataLoader([{"id": str(n), "image": i, "mask": m} for n, (i, m) in enumerate(zip(images, masks))], batch_size=2)

    def trained(steps: int, hold: int) -> tuple[SegmenterSystem, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        system = SegmenterSystem(weights=f"classifier:{path}", width=0.125, new_layers_first=hold)
        start = {k: v.clone() for k, v in system.state_dict().items()}
        pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu").fit(system, loader)
        return system, start

    system, start = trained(steps=3, hold=3)
    now = system.state_dict()
    assert all(value.isfinite().all() for value in now.values())
    assert torch.equal(now["model.features.28.weight"], start["model.features.28.weight"])
    assert not torch.equal(now["model.fc6.weight"], start["model.fc6.weight"])
    assert not torch.equal(now["model.fc8.weight"], start["model.fc8.weight"])
    system, start = trained(steps=4, hold=3)
    assert not torch.equal(system.state_dict()["model.features.28.weight"], start["model.features.28.weight"])


# ----------------------------------------------------------------------------- train-seg CLI
def test_train_seg_on_gt_masks_writes_best_and_last(toy_root, tmp_path):
    assert wsss_main(train_args(toy_root, tmp_path, "gt")) == 0
    assert (tmp_path / "ckpt" / "best.ckpt").is_file() and (tmp_path / "ckpt" / "last.ckpt").is_file()
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["width"] == float(WIDTH)
    assert list((tmp_path / "runs").rglob("metrics.csv")), "CSV logs go to the given save_dir"


def test_resume_continues_the_global_step(trained, toy_root, tmp_path):
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    last = tmp_path / "ckpt" / "last.ckpt"
    args = train_args(toy_root, tmp_path, str(trained / "pseudo"), 4, "--ckpt_path", str(last))
    assert wsss_main(args) == 0
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4


def test_missing_pseudo_labels_are_listed_before_training(toy_root, tmp_path, capsys):
    pseudo = copy_labels(toy_root, tmp_path / "pseudo")
    train_ids = VOCLayout(toy_root).read_ids("train")
    for image_id in train_ids[:3]:
        (pseudo / f"{image_id}.png").unlink()
    assert wsss_main(train_args(toy_root, tmp_path, str(pseudo))) == 2
    err = capsys.readouterr().err
    assert f"3 of {len(train_ids)}" in err and all(i in err for i in train_ids[:3])
    assert not (tmp_path / "ckpt").exists()


def test_bad_label_values_name_the_file(toy_root, tmp_path, capsys):
    def corrupt(labels: np.ndarray) -> np.ndarray:
        labels = labels.copy()
        labels[0, 0] = 30
        return labels

    pseudo = copy_labels(toy_root, tmp_path / "pseudo", corrupt)
    assert wsss_main(train_args(toy_root, tmp_path, str(pseudo))) == 2
    err = capsys.readouterr().err
    assert "label values outside" in err and str(pseudo) in err and "[30]" in err


@pytest.fixture()
def classifier_checkpoint(tmp_path) -> Path:
    """A Lightning-format checkpoint of the stage-1 classifier (random weights)."""
    import pytorch_lightning as pl

    from wsss.systems.classifier import ClassifierSystem

    system = ClassifierSystem(weights="none", width=0.125)
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams),
                "pytorch-lightning_version": pl.__version__, "global_step": 0, "epoch": 0}, path)
    return path


def test_classifier_checkpoint_is_refused_by_ckpt_path(toy_root, tmp_path, classifier_checkpoint, capsys):
    args = train_args(toy_root, tmp_path, "gt", 2, "--ckpt_path", str(classifier_checkpoint))
    assert wsss_main(args) == 2
    assert "not a DeepLab-LargeFOV segmenter checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- predict-seg CLI
def predict_args(checkpoint: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return ["predict-seg", "--checkpoint", str(checkpoint), "--data-root", str(root), "--out", str(out),
            "--accelerator", "cpu", "--devices", "1", "--num-workers", "0", *extra]


def test_predict_seg_writes_one_png_per_val_image(trained, toy_root, tmp_path):
    out, split = tmp_path / "pred", str(val_list(toy_root, tmp_path))
    assert wsss_main(predict_args(trained / "ckpt" / "best.ckpt", toy_root, out, "--split", split, "--scales", "0.75,1", "--flip")) == 0
    layout = VOCLayout(toy_root)
    val_ids = layout.read_ids(split)
    assert len(val_ids) == NUM_VAL
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(val_ids)
    for image_id in val_ids:
        labels = read_label_png(out / f"{image_id}.png")
        assert labels.shape == read_label_png(layout.mask_path(image_id)).shape
        assert labels.max() <= 20
    # The same settings again: existing PNGs are skipped (a resumed run), whatever the resources.
    stamp = (out / f"{val_ids[0]}.png").stat().st_mtime_ns
    same = predict_args(trained / "ckpt" / "best.ckpt", toy_root, out, "--split", split, "--scales", "0.75,1", "--flip", "--num-workers", "0")
    assert wsss_main(same) == 0
    assert (out / f"{val_ids[0]}.png").stat().st_mtime_ns == stamp


def test_predict_seg_png_mode_gray_writes_the_same_indices_and_redoes_palette_pngs(trained, toy_root, tmp_path, capsys):
    from PIL import Image

    out, split = tmp_path / "pred", str(val_list(toy_root, tmp_path))
    checkpoint = trained / "ckpt" / "best.ckpt"
    assert wsss_main(predict_args(checkpoint, toy_root, out, "--split", split)) == 0
    ids = VOCLayout(toy_root).read_ids(split)
    palette = {i: np.asarray(Image.open(out / f"{i}.png")) for i in ids}
    assert {Image.open(out / f"{i}.png").mode for i in ids} == {"P"}
    capsys.readouterr()
    # A palette PNG is not a gray one: refused, all redone with --overwrite, then kept by a second gray run.
    assert wsss_main(predict_args(checkpoint, toy_root, out, "--split", split, "--png-mode", "gray")) == 2
    assert "png_mode: 'palette' -> 'gray'" in capsys.readouterr().err
    assert wsss_main(predict_args(checkpoint, toy_root, out, "--split", split, "--png-mode", "gray", "--overwrite")) == 0
    assert f"{len(ids)} label PNGs written, 0 already" in capsys.readouterr().out
    for image_id in ids:
        with Image.open(out / f"{image_id}.png") as image:
            assert image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), palette[image_id])
    stamps = {i: (out / f"{i}.png").stat().st_mtime_ns for i in ids}
    assert wsss_main(predict_args(checkpoint, toy_root, out, "--split", split, "--png-mode", "gray")) == 0
    assert f"0 label PNGs written, {len(ids)} already" in capsys.readouterr().out
    assert {i: (out / f"{i}.png").stat().st_mtime_ns for i in ids} == stamps


def test_evaluator_matches_the_validation_loop(trained, toy_root, tmp_path):
    import pytorch_lightning as pl

    from wsss.data.modules import SegmentationDataModule
    from wsss.stages.evaluate import evaluate_labels

    # Sharpen the trained head so predictions vary across pixels and classes (a 2-step model
    # predicts nearly all background, which would make the comparison trivial).
    checkpoint = torch.load(trained / "ckpt" / "best.ckpt", map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    checkpoint["state_dict"]["model.fc8.weight"] = torch.randn(checkpoint["state_dict"]["model.fc8.weight"].shape, generator=generator)
    path = tmp_path / "sharp.ckpt"
    torch.save(checkpoint, path)

    system = SegmenterSystem(weights="none", width=float(WIDTH))
    split = str(val_list(toy_root, tmp_path))
    data = SegmentationDataModule(train_labels="gt", root=str(toy_root), val_split=split, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    validation_miou = trainer.validate(system, datamodule=data, ckpt_path=str(path), verbose=False)[0]["val/mIoU"]

    out = tmp_path / "pred"
    assert wsss_main(predict_args(path, toy_root, out, "--split", split)) == 0
    layout = VOCLayout(toy_root)
    scores = evaluate_labels(out, layout.mask_dir, layout.read_ids(split))
    assert scores.confusion.sum(axis=0).astype(bool).sum() > 2, "predictions should use several classes"
    assert scores.miou == pytest.approx(validation_miou, abs=1e-6)


def test_classifier_checkpoint_is_refused_by_predict_seg(classifier_checkpoint, toy_root, tmp_path, capsys):
    assert wsss_main(predict_args(classifier_checkpoint, toy_root, tmp_path / "pred")) == 2
    err = capsys.readouterr().err
    assert "not a DeepLab-LargeFOV segmenter checkpoint" in err and "classifier" in err
    assert not (tmp_path / "pred").exists()


@pytest.mark.skipif(crf_available(), reason="pydensecrf is installed")
def test_crf_without_pydensecrf_says_how_to_install(trained, toy_root, tmp_path, capsys):
    assert wsss_main(predict_args(trained / "ckpt" / "best.ckpt", toy_root, tmp_path / "pred", "--crf")) == 2
    assert "pip install 'wsss[crf]'" in capsys.readouterr().err


def test_dense_crf_snaps_a_blurry_boundary_to_the_colour_edge():
    """With pydensecrf installed (`pip install -e ".[crf]"`), the CRF moves a soft, misplaced
    boundary onto the image's colour edge; skipped where the optional extra is absent."""
    pytest.importorskip("pydensecrf.densecrf")
    from wsss.crf import dense_crf

    height, width = 40, 60
    image = np.zeros((height, width, 3), np.uint8)
    image[:, 30:] = (230, 40, 40)  # colour edge at column 30
    # Probabilities whose 50/50 crossing sits at column 22 instead, and stay unsure (0.6) near it.
    columns = np.arange(width)
    p_right = 1 / (1 + np.exp(-(columns - 22) / 6.0))
    probs = np.stack([np.broadcast_to(1 - p_right, (height, width)), np.broadcast_to(p_right, (height, width))]).astype(np.float32)
    before = probs.argmax(0)
    after = dense_crf(image, probs).argmax(0)
    truth = np.broadcast_to(columns >= 30, (height, width)).astype(int)
    assert (before == truth).mean() < 0.9
    assert (after == truth).mean() > (before == truth).mean() + 0.05
