"""VOC data layer: layout, id lists, image-level labels, paired transforms, toy data, check-data."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.cli import main as cli
from wsss.data.toy import make_toy_voc
from wsss.data.transforms import fit_transform, to_tv, train_transform
from wsss.data.voc import ImageLabels, VOCLayout, multi_hot_from_mask, read_id_list
from wsss.errors import DataError
from wsss.formats.images import read_image
from wsss.formats.label_png import read_label_png


def test_layout_accepts_voc2012_vocdevkit_and_parent(toy_root):
    devkit = toy_root.parent
    (devkit / "VOCdevkit").mkdir(exist_ok=True)
    link = devkit / "VOCdevkit" / "VOC2012"
    if not link.exists():
        link.symlink_to(toy_root)
    for root in (toy_root, devkit / "VOCdevkit", devkit):
        assert VOCLayout(root).image_dir.resolve() == (toy_root / "JPEGImages").resolve()
    assert VOCLayout(toy_root).mask_dir.name == "SegmentationClassAug"


def test_mask_folder_falls_back_to_segmentation_class(tmp_path):
    root = make_toy_voc(tmp_path / "v", num_train=2, num_val=1, num_train_subset=1)
    for png in (root / "SegmentationClassAug").iterdir():
        png.unlink()
    (root / "SegmentationClassAug").rmdir()
    assert VOCLayout(root).mask_dir.name == "SegmentationClass"


def test_missing_root_and_non_voc_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        VOCLayout(tmp_path / "nope")
    with pytest.raises(DataError, match="JPEGImages"):
        VOCLayout(tmp_path)


def test_id_list_parsing(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes(b"a_1\r\n\r\nb_2\na_1\n  c-3  \n")
    with pytest.warns(UserWarning, match="1 duplicate"):
        assert read_id_list(good) == ["a_1", "b_2", "c-3"]
    for line in ("../etc/passwd", "/abs/path", "sub/dir", ".hidden"):
        bad = tmp_path / "bad.txt"
        bad.write_text(f"ok_1\n{line}\n")
        with pytest.raises(DataError, match="line 2"):
            read_id_list(bad)
    with pytest.raises(DataError, match="not found"):
        read_id_list(tmp_path / "missing.txt")


def test_ids_without_images_are_reported_all_at_once(toy_root, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("toy_00000\nghost_1\nghost_2\n")
    layout = VOCLayout(toy_root)
    with pytest.raises(DataError, match="2 listed ids have no image.*ghost_1, ghost_2"):
        layout.check_images(layout.read_ids(listed))


def test_labels_from_hand_made_mask():
    mask = np.array([[0, 3, 3], [255, 15, 0], [0, 0, 255]], dtype=np.uint8)
    expected = np.zeros(20, dtype=np.float32)
    expected[[2, 14]] = 1  # bird (3) and person (15)
    np.testing.assert_array_equal(multi_hot_from_mask(mask), expected)


def test_label_sources_agree_on_toy_data_and_table_is_read(toy_root, tmp_path):
    layout = VOCLayout(toy_root)
    ids = layout.read_ids("train_aug")
    from_xml, from_masks = ImageLabels(layout, "auto"), ImageLabels(layout, "masks")
    assert from_xml.kind == "annotations"
    for image_id in ids:
        np.testing.assert_array_equal(from_xml(image_id), from_masks(image_id))
    # IRN's cls_labels.npy: integer keys (underscore dropped) for numeric ids, plain ids otherwise.
    table = {image_id: from_masks(image_id) for image_id in ids}
    np.save(tmp_path / "cls_labels.npy", table, allow_pickle=True)
    from_table = ImageLabels(layout, str(tmp_path / "cls_labels.npy"))
    np.testing.assert_array_equal(from_table(ids[3]), from_masks(ids[3]))
    with pytest.raises(DataError, match="no image-level labels"):
        from_table.check(["2007_000032"])
    np.save(tmp_path / "irn.npy", {2007000032: np.eye(20)[4]}, allow_pickle=True)
    np.testing.assert_array_equal(ImageLabels(layout, str(tmp_path / "irn.npy"))("2007_000032"), np.eye(20)[4])


def test_auto_labels_use_the_roots_cls_labels_table_when_there_are_no_annotations(tmp_path):
    root = make_toy_voc(tmp_path / "v", num_train=2, num_val=1, num_train_subset=1)
    shutil.rmtree(root / "Annotations")
    assert ImageLabels(VOCLayout(root)).kind == "masks"
    np.save(root / "cls_labels.npy", {"toy_00000": np.eye(20, dtype=np.float32)[6]}, allow_pickle=True)
    labels = ImageLabels(VOCLayout(root))
    assert labels.kind == "table" and "cls_labels.npy" in labels.description
    assert np.flatnonzero(labels("toy_00000")).tolist() == [6]  # the table's car, not the mask's classes
    with pytest.raises(DataError, match="1 listed ids have no image-level labels.*toy_00001"):
        labels.check(["toy_00000", "toy_00001"])


def test_annotation_labels_differ_from_masks_when_xml_says_so(toy_root, tmp_path):
    root = make_toy_voc(tmp_path / "v", num_train=1, num_val=1, num_train_subset=1)
    (root / "Annotations" / "toy_00000.xml").write_text("<annotation><object><name>dog</name></object></annotation>")
    labels = ImageLabels(VOCLayout(root))
    assert np.flatnonzero(labels("toy_00000")).tolist() == [11]


def _checkable_pair(height: int = 60, width: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel encodes the column and green the row, and a mask of
    the column index mod 20 + 1: any misalignment between them is detectable pixel by pixel."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([cols * 255 // (width - 1), rows * 255 // (height - 1), np.zeros_like(cols)], -1).astype(np.uint8)
    mask = (cols // 5 % 20 + 1).astype(np.uint8)
    return image, mask


def test_train_transform_keeps_image_and_mask_aligned():
    image, mask = _checkable_pair()
    transform = train_transform(48, scale_range=(0.6, 1.6), flip=True, color_jitter=0.0)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out_mask = transform(*to_tv(image, mask))
        assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48) and out_mask.dtype == torch.uint8
        pixels = (out_image * std + mean) * 255
        column = pixels[0] / 255 * (image.shape[1] - 1)  # red channel -> original column
        valid = out_mask != 255
        assert valid.sum() > 100
        expected = (torch.round(column) // 5 % 20 + 1).to(torch.uint8)
        # Interpolation blurs image values near the mask's label boundaries; away from them they agree.
        interior = valid & (torch.round(column) % 5 >= 1) & (torch.round(column) % 5 <= 3)
        agreement = (expected[interior] == out_mask[interior]).float().mean()
        assert agreement > 0.97, (seed, agreement)
        # Mask values never get interpolated: only labels that exist, or the 255 padding.
        assert set(out_mask.unique().tolist()) <= set(range(1, 21)) | {255}


def test_padding_fills_mask_with_ignore_and_image_with_mean():
    image, mask = _checkable_pair(20, 30)
    torch.manual_seed(0)
    out_image, out_mask = train_transform(64, scale_range=(1.0, 1.0), flip=False, color_jitter=0.0)(*to_tv(image, mask))
    padded = out_mask == 255
    assert padded.sum() == 64 * 64 - 20 * 30
    assert out_image[:, padded].abs().max() < 0.02  # mean colour normalises to ~0


def test_fit_transform_is_deterministic():
    image, _ = _checkable_pair(50, 70)
    first, second = fit_transform(64)(*to_tv(image)), fit_transform(64)(*to_tv(image))
    assert first.shape == (3, 64, 64) and torch.equal(first, second)


def test_toy_dataset_is_deterministic_and_well_formed(tmp_path):
    a = make_toy_voc(tmp_path / "a", seed=3, num_train=4, num_val=2, num_train_subset=2)
    b = make_toy_voc(tmp_path / "b", seed=3, num_train=4, num_val=2, num_train_subset=2)
    ids = VOCLayout(a).read_ids("train_aug") + VOCLayout(a).read_ids("val")
    assert VOCLayout(a).read_ids("train") == ids[:2]
    for image_id in ids:
        image = read_image(a / "JPEGImages" / f"{image_id}.jpg")
        mask = read_label_png(a / "SegmentationClassAug" / f"{image_id}.png")
        assert mask.shape == image.shape[:2]
        assert Image.open(a / "SegmentationClassAug" / f"{image_id}.png").mode == "P"
        np.testing.assert_array_equal(mask, read_label_png(b / "SegmentationClassAug" / f"{image_id}.png"))
        classes = set(np.unique(mask).tolist()) - {0, 255}
        assert 1 <= len(classes) <= 3


def test_bad_images_and_masks_raise_errors_naming_the_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jpg.*0 bytes"):
        read_image(tmp_path / "empty.jpg")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(DataError, match="cut.jpg.*truncated"):
        read_image(tmp_path / "cut.jpg")
    bad = Image.fromarray(np.full((4, 4), 77, np.uint8), mode="L")
    bad.save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad.png.*outside.*\[77\]"):
        read_label_png(tmp_path / "bad.png")
    for mode in ("L", "CMYK", "RGBA"):
        Image.new(mode, (5, 4)).save(tmp_path / f"{mode}.{'png' if mode != 'CMYK' else 'jpg'}")
        assert read_image(tmp_path / f"{mode}.{'png' if mode != 'CMYK' else 'jpg'}").shape == (4, 5, 3)


def test_check_data_reports_every_problem(tmp_path, capsys):
    root = make_toy_voc(tmp_path / "v", num_train=6, num_val=2, num_train_subset=3)
    assert cli(["check-data", str(root), "--workers", "1"]) == 0
    (root / "JPEGImages" / "toy_00001.jpg").write_bytes(b"not a jpeg")
    Image.new("P", (7, 7)).save(root / "SegmentationClassAug" / "toy_00002.png")
    (root / "JPEGImages" / "toy_00003.jpg").unlink()
    assert cli(["check-data", str(root), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "toy_00001.jpg: unreadable" in out
    assert "toy_00002.png: mask is 7x7" in out
    assert "toy_00003.jpg: listed in" in out
