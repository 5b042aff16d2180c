"""COCO 2014 and other label sets through the stages: the COCO WSSS layout, its label table as the
field saves it, class counts checked against the data, and a COCO-style toy folder through `wsss run`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from test_io import save_npy_protocol2
from test_pipeline import tiny_config
from wsss.classes import COCO_CLASS_NAMES, LABEL_SETS
from wsss.cli import main as cli_main
from wsss.data import open_layout
from wsss.data.coco import COCOLayout
from wsss.data.toy import make_toy_coco
from wsss.data.voc import ImageLabels, VOCLayout, multi_hot_from_mask
from wsss.errors import ConfigError, DataError
from wsss.formats.label_png import read_label_png
from wsss.models.classifier import CAMClassifier
from wsss.report.draw import present_classes


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_toy_coco(tmp_path_factory.mktemp("coco") / "coco2014", num_train=48, num_val=16)


def test_the_coco_layout_finds_images_masks_table_and_lists(coco_root):
    layout = open_layout(coco_root)
    assert isinstance(layout, COCOLayout) and layout.labels == LABEL_SETS["coco"] and layout.num_classes == 80
    train, val = layout.read_ids("train2014"), layout.read_ids("val2014")
    assert len(train) == 48 and len(val) == 16 and train[0].startswith("COCO_train2014_")
    assert layout.image_path(train[0]) == coco_root / "train2014" / f"{train[0]}.jpg"
    assert layout.mask_path(val[0]) == coco_root / "SegmentationClass" / "val2014" / f"{val[0]}.png"
    layout.check_images(train + val)
    layout.check_masks(train + val)
    assert layout.mask_dir_for(val) == coco_root / "SegmentationClass" / "val2014"
    with pytest.raises(DataError, match="2 folders"):
        layout.mask_dir_for(train[:1] + val[:1])
    # The toy's classes carry COCO's values: potted plant is 59, above anything VOC has.
    values = set().union(*(np.unique(read_label_png(layout.mask_path(i), labels=layout.labels)) for i in train))
    assert COCO_CLASS_NAMES.index("potted plant") + 1 in values and max(values - {255}) > 20
    # `wsss check-data` decodes every listed image and mask of both splits.
    assert cli_main(["check-data", str(coco_root), "--workers", "1"]) == 0
    # A VOC folder stays a VOC layout.
    assert isinstance(open_layout("toy"), VOCLayout)


def test_the_label_table_agrees_with_the_masks_under_every_key_the_field_uses(coco_root, tmp_path):
    layout = open_layout(coco_root)
    ids = layout.read_ids("train2014")
    from_table, from_masks = ImageLabels(layout), ImageLabels(layout, "masks")
    assert from_table.kind == "table" and from_table.table_path == coco_root / "cls_labels_coco.npy"
    for image_id in ids:
        table_row = from_table(image_id)
        assert table_row.shape == (80,)
        # the table leaves out objects occluded below MIN_VISIBLE_PIXELS, which the masks still show
        assert set(np.flatnonzero(table_row)) <= set(np.flatnonzero(from_masks(image_id)))
    # The COCO WSSS tables file ids as the full name, as the number's text or as an integer; pickled
    # with protocol 2 as NumPy of the Python 2 era saved them.
    table = np.load(coco_root / "cls_labels_coco.npy", allow_pickle=True).item()
    for name, key in (("text", lambda i: i.rsplit("_", 1)[1]), ("int", lambda i: int(i.rsplit("_", 1)[1]))):
        path = tmp_path / f"cls_labels_{name}.npy"
        save_npy_protocol2(path, {key(i): row for i, row in table.items()})
        labels = ImageLabels(layout, path)
        labels.check(ids)
        np.testing.assert_array_equal(labels(ids[3]), from_table(ids[3]))
    # VOC-sized rows in a COCO dataset name the label set.
    path = tmp_path / "voc_rows.npy"
    np.save(path, {i: np.zeros(20, np.float32) for i in ids}, allow_pickle=True)
    with pytest.raises(DataError, match="has 20 values, expected 80.*'coco'"):
        ImageLabels(layout, path)(ids[0])


def test_a_dataset_declares_its_own_classes_beside_its_images(tmp_path):
    from wsss.data.toy import make_toy_voc

    root = make_toy_voc(tmp_path / "own", num_train=4, num_val=2, num_train_subset=2)
    names = ["background", *[f"thing{k}" for k in range(1, 31)]]
    (root / "label_set.yaml").write_text(yaml.safe_dump({"name": "mine", "names": names}))
    layout = open_layout(root)
    assert layout.labels.name == "mine" and layout.num_classes == 30
    mask = np.array([[0, 25, 255], [3, 3, 0]], np.uint8)
    np.testing.assert_array_equal(np.flatnonzero(multi_hot_from_mask(mask, layout.labels)), [2, 24])
    assert ImageLabels(layout, "masks")(layout.read_ids("train")[0]).shape == (30,)
    (root / "label_set.yaml").write_text(yaml.safe_dump({"names": names, "background": 3}))
    with pytest.raises(ConfigError, match="background must be label value 0"):
        open_layout(root)


def test_present_classes_uses_the_label_sets_names():
    label_map = np.array([[0, 59], [80, 255]], np.uint8)
    assert present_classes(label_map, LABEL_SETS["coco"].names) == ["potted plant", "toothbrush"]
    assert present_classes(np.array([[0, 15]], np.uint8)) == ["person"]  # VOC by default


def test_training_refuses_a_class_count_the_data_does_not_have(coco_root, tmp_path, capsys):
    args = ["train-cls", "-c", "configs/toy/classifier.yaml", "--data.root", str(coco_root), "--data.train_split", "train2014",
            "--data.val_split", "val2014", "--trainer.max_epochs", "1", "--data.num_workers", "0", "--checkpoint.dirpath", str(tmp_path / "c"),
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    assert cli_main(args) != 0
    assert "model.num_classes is 20, but the data's label set 'coco' has 80 foreground classes: set model.num_classes: 80" in capsys.readouterr().err
    seg = ["train-seg", "-c", "configs/toy/segmenter.yaml", "--data.root", str(coco_root), "--data.train_labels", "gt",
           "--data.train_split", "train2014", "--data.val_split", "val2014", "--model.weights", "none", "--data.num_workers", "0",
           "--trainer.max_steps", "1", "--checkpoint.dirpath", str(tmp_path / "s"), "--trainer.logger", "false",
           "--trainer.default_root_dir", str(tmp_path)]
    assert cli_main(seg) != 0
    assert "model.num_classes is 21, but the data's label set 'coco' has 81 labels, background included" in capsys.readouterr().err


def test_cams_refuse_a_classifier_of_other_classes(coco_root, tmp_path):
    from wsss.stages.cams import CamOptions, make_cams
    from wsss.systems.predictors import CamVariant

    voc_model = CAMClassifier(num_classes=20, weights="none", width=0.125).eval()
    with pytest.raises(ConfigError, match="20 outputs, but the dataset's label set 'coco' has 80 classes"):
        make_cams(voc_model, coco_root, {tmp_path / "cams": CamVariant()}, CamOptions(num_workers=0), split="val2014", progress=False)


def test_a_coco_style_folder_through_wsss_run(coco_root, tmp_path, capsys):
    """classifier -> CAMs -> pseudo-labels -> segmenter -> evaluate on COCO's 80 classes, through the CLI,
    the split names, class counts and label set all coming from the folder."""
    out = tmp_path / "out"
    config = tiny_config(tmp_path / "pipeline.yaml", coco_root, out, cam_split="train2014", eval_split="train2014", val_split="val2014",
                         classifier={"data": {"crop_size": 64, "batch_size": 8, "num_workers": 0, "train_split": "train2014"}},
                         cams={"num_workers": 0, "batch_size": 4, "baselines": ["gradcam"]})
    assert cli_main(["run", "-c", str(config), "--until", "evaluate"]) == 0
    layout = open_layout(coco_root)
    train = layout.read_ids("train2014")
    checkpoint = torch.load(out / "classifier" / "best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["num_classes"] == 80
    with np.load(out / "cams" / "layercam" / f"{train[0]}.npz") as data:
        classes = set(data["classes"].tolist())
    assert classes == set((np.flatnonzero(ImageLabels(layout)(train[0])) + 1).tolist())
    pseudo_values = set().union(*(np.unique(read_label_png(out / "pseudo" / "layercam" / f"{i}.png", labels=layout.labels)) for i in train))
    assert max(pseudo_values - {255}) > 20  # COCO values made it into the pseudo-labels
    results = json.loads((out / "results.json").read_text())
    rows = {(r["stage"], r["split"]) for r in results["rows"]}
    assert {("CAM seeds", "train2014"), ("pseudo-labels", "train2014"), ("segmenter", "val2014")} <= rows
    # The pipeline's scores are the standalone evaluator's with the coco label set.
    capsys.readouterr()
    json_path = tmp_path / "val.json"
    assert cli_main(["evaluate", "--pred", str(out / "predictions" / "val2014"), "--gt", str(coco_root / "SegmentationClass" / "val2014"),
                     "--label-set", "coco", "--json", str(json_path), "--workers", "1"]) == 0
    segmenter_row = next(r for r in results["rows"] if r["stage"] == "segmenter" and r["split"] == "val2014")
    assert json.loads(json_path.read_text())["miou"] == pytest.approx(segmenter_row["value"], abs=1e-9)


def test_repeat_factors_by_hand_and_the_sampler_draws_rare_classes_more(tmp_path):
    from wsss.data.modules import SegmentationDataModule, present_label_classes, repeat_factors
    from wsss.formats.label_png import write_label_png

    # Class 1 in 3 of 4 images (f = 0.75), class 2 in 1 (f = 0.25); t = 0.5: r_1 = 1, r_2 = sqrt(2).
    factors = repeat_factors([frozenset({1}), frozenset({1}), frozenset({1}), frozenset({2})], 0.5)
    np.testing.assert_allclose(factors, [1, 1, 1, np.sqrt(2)])
    np.testing.assert_allclose(repeat_factors([frozenset({3}), frozenset()], 1.0), [np.sqrt(2), 1])
    write_label_png(tmp_path / "a.png", np.array([[0, 7, 255], [7, 0, 12]], np.uint8))
    assert present_label_classes(tmp_path / "a.png", LABEL_SETS["voc"]) == {7, 12}
    with pytest.raises(ConfigError, match=r"repeat_factor_threshold must be in \(0, 1\]"):
        SegmentationDataModule("gt", "toy", repeat_factor_threshold=0)


def test_the_segmenter_data_oversamples_images_of_rare_classes(toy_root):
    from collections import Counter

    from wsss.data.modules import SegmentationDataModule

    torch.manual_seed(0)
    data = SegmentationDataModule("gt", str(toy_root), train_split="train", batch_size=1, num_workers=0, repeat_factor_threshold=1.0)
    data.setup("fit")
    loader = data.train_dataloader()
    factors = np.asarray(loader.sampler.weights)
    assert factors.min() >= 1 and factors.max() > factors.min()
    draws = Counter(index for _ in range(40) for index in loader.sampler)
    rare, common = factors.argmax(), factors.argmin()
    assert draws[rare] > draws[common]


def test_wsss_run_refuses_a_crf_option_without_pydensecrf_before_any_step(tmp_path, toy_root, monkeypatch, capsys):
    import wsss.crf

    monkeypatch.setattr(wsss.crf, "crf_available", lambda: False)
    config = tiny_config(tmp_path / "pipeline.yaml", toy_root, tmp_path / "out", predict={"num_workers": 0, "crf": True})
    assert cli_main(["run", "-c", str(config)]) == 2
    assert "predict.crf: dense CRF needs pydensecrf" in capsys.readouterr().err
    assert not (tmp_path / "out" / "classifier").exists()
