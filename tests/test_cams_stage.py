"""`wsss cams` through its real CLI on the toy data."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from wsss.cams import compute_cams, fuse_cams, normalize_maps
from wsss.cli import main as cli
from wsss.data.transforms import eval_transform, to_tv
from wsss.data.voc import ImageLabels, VOCLayout
from wsss.formats.cams import read_cams
from wsss.formats.images import read_image
from wsss.formats.irn import write_irn_cams
from wsss.formats.label_png import read_label_png
from wsss.pseudo import cam_seed_labels
from wsss.records import RECORD_FILE
from wsss.systems.checkpoints import load_classifier
from wsss.systems.classifier import ClassifierSystem
from wsss.systems.predictors import CamPredictor, CamVariant


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    """A random narrow classifier saved the way train-cls saves it (hyper-parameters + state dict)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        system = ClassifierSystem(weights="none", width=0.125)
    path = tmp_path_factory.mktemp("cls") / "classifier.ckpt"
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, path)
    return path


def _cams(toy_root, ckpt, out, *extra):
    return cli(["cams", "--checkpoint", str(ckpt), "--data-root", str(toy_root), "--split", "train", "--out", str(out), "--num-workers", "0", "--accelerator", "cpu", *extra])


def test_cams_cli_writes_one_valid_file_per_image_matching_the_math(toy_root, classifier_ckpt, tmp_path):
    out = tmp_path / "cams"
    assert _cams(toy_root, classifier_ckpt, out, "--save-layers", "--batch-size", "3") == 0
    layout = VOCLayout(toy_root)
    ids = layout.read_ids("train")
    assert sorted(p.stem for p in out.glob("*.npz")) == sorted(ids)
    labels = ImageLabels(layout)
    model = load_classifier(classifier_ckpt)
    for image_id in ids[:3]:
        with np.load(out / f"{image_id}.npz") as saved:
            image = read_image(layout.image_path(image_id))
            classes = np.flatnonzero(labels(image_id)) + 1
            np.testing.assert_array_equal(saved["classes"], classes)
            assert saved["classes"].dtype == np.int64 and saved["cams"].dtype == np.float16
            assert saved["cams"].shape == (len(classes), *image.shape[:2])
            assert 0 <= saved["cams"].min() and saved["cams"].max() <= 1
            # Independent recomputation: raw maps, upsample, then normalise and fuse (stage3 scaled).
            tensor = eval_transform()(*to_tv(image))[None]
            raw = compute_cams(model, tensor, [list(classes - 1)], ["stage3", "stage4", "stage5"])
            size = image.shape[:2]
            upsampled = [torch.nn.functional.interpolate(raw[layer][0][None], size=size, mode="bilinear", align_corners=False)[0] for layer in raw]
            expected = fuse_cams(upsampled, size, [True, False, False])
            np.testing.assert_allclose(saved["cams"].astype(np.float32), expected.numpy(), atol=2e-3)
            np.testing.assert_allclose(saved["stage5"].astype(np.float32), normalize_maps(upsampled[2]).numpy(), atol=2e-3)


def irn_seed_labels_of_high_res(pack: dict, threshold: float) -> np.ndarray:
    """IRN's step/cam_to_ir_label.py up to its CRF: ``high_res`` with a constant background plane
    in front, argmax, mapped through ``keys`` (0-based, padded with the background 0)."""
    keys = np.pad(pack["keys"] + 1, (1, 0), mode="constant")
    padded = np.pad(pack["high_res"], ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=threshold)
    return keys[np.argmax(padded, axis=0)]


def irn_sem_seg_labels_of_cam(pack: dict, size: tuple[int, int], threshold: float) -> np.ndarray:
    """IRN's step/make_sem_seg_labels.py with the random walk left out (it needs IRN's edge
    network): the stride-4 ``cam`` tensor upsampled x4 bilinearly, cropped to the image, divided by
    its maximum, a background plane of ``threshold`` in front, argmax, mapped through ``keys``."""
    keys = np.pad(pack["keys"] + 1, (1, 0), mode="constant")
    walked = pack["cam"].float()[:, None]  # (K, 1, h, w), what propagate_to_edge returns
    upsampled = torch.nn.functional.interpolate(walked, scale_factor=4, mode="bilinear", align_corners=False)[..., 0, :size[0], :size[1]]
    upsampled = upsampled / torch.max(upsampled)
    with_background = torch.nn.functional.pad(upsampled, (0, 0, 0, 0, 1, 0), value=threshold)
    return keys[torch.argmax(with_background, dim=0).numpy()]


def distance_to_label_boundary(labels: np.ndarray) -> np.ndarray:
    """Per pixel, the Euclidean distance in pixels to the nearest pixel whose 4-neighbour has another label."""
    from scipy.ndimage import distance_transform_edt

    boundary = np.zeros(labels.shape, dtype=bool)
    rows, cols = labels[:-1] != labels[1:], labels[:, :-1] != labels[:, 1:]
    boundary[:-1] |= rows
    boundary[1:] |= rows
    boundary[:, :-1] |= cols
    boundary[:, 1:] |= cols
    return distance_transform_edt(~boundary) if boundary.any() else np.full(labels.shape, np.inf)


def test_irn_format_is_read_by_irns_next_steps_as_irns_own_files(toy_root, classifier_ckpt, tmp_path, capsys):
    """IRN's two readers of make_cam.py's files, cam_to_ir_label.py (``high_res``) and
    make_sem_seg_labels.py (the stride-4 ``cam``), run their own operations on our files and get
    the labels our seed rule gives on the same maps."""
    npz_dir, irn_dir = tmp_path / "npz", tmp_path / "irn"
    assert _cams(toy_root, classifier_ckpt, npz_dir) == 0
    assert _cams(toy_root, classifier_ckpt, irn_dir, "--format", "irn") == 0
    layout = VOCLayout(toy_root)
    ids = layout.read_ids("train")
    assert sorted(p.name for p in irn_dir.iterdir()) == sorted([*(f"{i}.npy" for i in ids), RECORD_FILE])
    labels = ImageLabels(layout)
    agree = total = 0
    farthest = 0.0
    for image_id in ids:
        path = irn_dir / f"{image_id}.npy"
        pack = np.load(path, allow_pickle=True).item()  # what both IRN steps do
        height, width = read_image(layout.image_path(image_id)).shape[:2]
        classes = np.flatnonzero(labels(image_id)) + 1
        # make_cam.py's types: keys and cam torch tensors (cam goes to the GPU as it is), high_res NumPy
        assert sorted(pack) == ["cam", "high_res", "keys"]
        assert isinstance(pack["keys"], torch.Tensor) and pack["keys"].dtype == torch.int64
        assert isinstance(pack["cam"], torch.Tensor) and pack["cam"].dtype == torch.float32
        assert isinstance(pack["high_res"], np.ndarray) and pack["high_res"].dtype == np.float32
        np.testing.assert_array_equal(np.pad(pack["keys"] + 1, (1, 0), mode="constant"), [0, *classes])
        assert pack["high_res"].shape == (len(classes), height, width)
        assert pack["cam"].shape == (len(classes), (height - 1) // 4 + 1, (width - 1) // 4 + 1)  # IRN's strided size
        # cam: the mean of each 4x4 block of high_res (torch's pooling over the partial edge blocks
        # divides by the pixels present), each class map divided by its maximum
        block_means = torch.nn.functional.avg_pool2d(torch.from_numpy(pack["high_res"]).double()[None], 4, 4, ceil_mode=True)[0]
        expected_cam = block_means / block_means.amax(dim=(1, 2), keepdim=True)
        torch.testing.assert_close(pack["cam"].double(), expected_cam, rtol=0, atol=1e-6)
        assert torch.all(pack["cam"].amax(dim=(1, 2)) == 1) and pack["cam"].min() >= 0

        maps, read_classes = read_cams(path)
        reference, reference_classes = read_cams(npz_dir / f"{image_id}.npz")
        np.testing.assert_array_equal(read_classes, classes)
        np.testing.assert_array_equal(reference_classes, classes)
        np.testing.assert_allclose(maps, reference.astype(np.float32), rtol=0, atol=2.0 ** -12)  # npz: float16, IRN: float32
        for threshold in (0.30, 0.05):  # cam_to_ir_label's conf_fg_thres and conf_bg_thres: the same maps, exactly
            np.testing.assert_array_equal(irn_seed_labels_of_high_res(pack, threshold), cam_seed_labels(maps, classes, threshold))
        # make_sem_seg_labels (sem_seg_bg_thres 0.25) reads the maps through a stride-4 grid, which
        # holds no detail finer than a cell: labels may differ only close to our label map's
        # boundaries. A cell's value spans 4 pixels and the x4 bilinear upsampling blends two cells,
        # and the re-normalisations by the maximum move a contour where a map is flat; within 3 cells
        # (12 px) of a boundary is what that allows, and most pixels must agree.
        ours = cam_seed_labels(maps, classes, 0.25)
        irn_labels = irn_sem_seg_labels_of_cam(pack, (height, width), 0.25)
        differ = irn_labels != ours
        agree += int((~differ).sum())
        total += ours.size
        if differ.any():
            farthest = max(farthest, float(distance_to_label_boundary(ours)[differ].max()))
    assert farthest <= 12, f"a label differs {farthest:g} px away from any boundary of ours"
    assert agree / total >= 0.9, f"only {agree / total:.1%} of the pixels agree"
    capsys.readouterr()
    assert cli(["pseudo-labels", "--data-root", str(toy_root), "--cams", str(irn_dir), "--out", str(tmp_path / "labels"), "--split", "train", "--workers", "1"]) == 0
    assert f"{len(ids)} written" in capsys.readouterr().out


def psa_labels(cam_dict: dict, size: tuple[int, int], alpha: float) -> np.ndarray:
    """PSA's infer_aff.py before its random walk: a (21, H, W) array filled from ``.items()`` at
    index class + 1, the background ``(1 - max) ** alpha`` in front, then the argmax is the label."""
    full = np.zeros((21, *size), np.float32)
    for key, value in cam_dict.items():
        full[key + 1] = value
    full[0] = (1 - np.max(full[1:], 0, keepdims=False)) ** alpha
    return np.argmax(full, axis=0)


def background_power_scores(maps: np.ndarray, alpha: float) -> np.ndarray:
    """(K + 1, H, W): the background score (1 - max over the classes) ** alpha, then the class maps."""
    return np.concatenate([(1 - maps.max(axis=0, keepdims=True, initial=0)) ** alpha, maps])


def background_power_labels(maps: np.ndarray, classes: np.ndarray, alpha: float) -> np.ndarray:
    """Label values: 0 where the background score wins, else the best class (first on ties)."""
    return np.concatenate([[0], classes])[np.argmax(background_power_scores(maps, alpha), axis=0)]


def test_psa_format_is_read_by_psas_random_walk_and_by_ours(toy_root, classifier_ckpt, tmp_path, capsys):
    npz_dir, psa_dir = tmp_path / "npz", tmp_path / "psa"
    assert _cams(toy_root, classifier_ckpt, npz_dir) == 0
    assert _cams(toy_root, classifier_ckpt, psa_dir, "--format", "psa") == 0
    layout = VOCLayout(toy_root)
    ids = layout.read_ids("train")
    assert sorted(p.name for p in psa_dir.iterdir()) == sorted([*(f"{i}.npy" for i in ids), RECORD_FILE])
    labels = ImageLabels(layout)
    for image_id in ids:
        cam_dict = np.load(psa_dir / f"{image_id}.npy", allow_pickle=True).item()  # infer_aff.py's read
        size = read_image(layout.image_path(image_id)).shape[:2]
        assert type(cam_dict) is dict
        assert [type(key) for key in cam_dict] == [int] * len(cam_dict)
        assert list(cam_dict) == (np.flatnonzero(labels(image_id))).tolist()  # 0-based, as PSA's label vector indexes them
        assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == size for v in cam_dict.values())
        # the npz run's maps, float16: the same maps up to float16 rounding (half a unit in the last place at [0.5, 1])
        reference, classes = read_cams(npz_dir / f"{image_id}.npz")
        maps, read_classes = read_cams(psa_dir / f"{image_id}.npy")
        np.testing.assert_array_equal(read_classes, classes)
        np.testing.assert_allclose(maps, reference.astype(np.float32), rtol=0, atol=2.0 ** -12)
        # PSA's labels from our file (alpha 16, its default) are those its rule gives on the maps we
        # read back, and on the npz run's maps wherever the two best scores are further apart than
        # float16 rounding can move them
        got = psa_labels(cam_dict, size, alpha=16)
        np.testing.assert_array_equal(got, background_power_labels(maps, classes, 16))
        reference_scores = background_power_scores(reference.astype(np.float32), 16)
        top_two = np.sort(reference_scores, axis=0)[-2:]
        clear = top_two[1] - top_two[0] > 17 * 2.0 ** -12  # a class score moves by the rounding, (1 - m) ** 16 up to 16x as far
        np.testing.assert_array_equal(got[clear], background_power_labels(reference.astype(np.float32), classes, 16)[clear])
        assert clear.mean() > 0.9
    capsys.readouterr()
    assert cli(["pseudo-labels", "--data-root", str(toy_root), "--cams", str(psa_dir), "--out", str(tmp_path / "labels"), "--split", "train", "--workers", "1"]) == 0
    assert f"{len(ids)} written" in capsys.readouterr().out
    assert cli(["eval-cams", "--cams", str(psa_dir), "--gt", str(layout.mask_dir), "--list", str(layout.list_path("train")), "--thresholds", "0.3", "--workers", "1"]) == 0
    assert "mIoU" in capsys.readouterr().out


@pytest.mark.parametrize("output_format", ["irn", "psa"])
def test_npy_formats_have_no_place_for_per_layer_maps(toy_root, classifier_ckpt, tmp_path, capsys, output_format):
    assert _cams(toy_root, classifier_ckpt, tmp_path / "o", "--format", output_format, "--save-layers") == 2
    err = capsys.readouterr().err
    assert "--save-layers" in err and output_format in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("output_format", ["npz", "irn", "psa"])
def test_cams_resume_skips_finished_files_and_overwrite_recomputes(toy_root, classifier_ckpt, tmp_path, capsys, output_format):
    out = tmp_path / "cams"
    suffix = {"npz": ".npz", "irn": ".npy", "psa": ".npy"}[output_format]
    if output_format != "npz":  # another format's files are another run's: refused, not counted as done
        assert _cams(toy_root, classifier_ckpt, tmp_path / "npz") == 0
        capsys.readouterr()
        assert _cams(toy_root, classifier_ckpt, tmp_path / "npz", "--format", output_format) == 2
        assert f"format: 'npz' -> '{output_format}'" in capsys.readouterr().err
    capsys.readouterr()
    assert _cams(toy_root, classifier_ckpt, out, "--format", output_format) == 0
    assert "0 already complete" in capsys.readouterr().out
    files = sorted(out.glob(f"*{suffix}"))
    # Simulate an interrupted run: one file missing, one cut in half, one without its maps (as a
    # crash before rename can't leave, but a copy from elsewhere might; for PSA, an IRN file).
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[: files[1].stat().st_size // 2])
    if output_format == "irn":  # what this project wrote before it added IRN's stride-4 cam
        maps, classes = read_cams(files[2])
        np.save(files[2], {"keys": classes - 1, "high_res": maps}, allow_pickle=True)
    elif output_format == "psa":
        maps, classes = read_cams(files[2])
        write_irn_cams(files[2], classes - 1, maps)
    else:
        np.savez(files[2], classes=np.zeros(0, np.int64))
    kept = {p: p.stat().st_mtime_ns for p in files[3:]}
    capsys.readouterr()
    assert _cams(toy_root, classifier_ckpt, out, "--format", output_format) == 0
    assert "3 CAM files written" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert read_cams(files[1])[0].ndim == 3
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    assert _cams(toy_root, classifier_ckpt, out, "--format", output_format, "--overwrite") == 0
    assert "written, 0 already" in capsys.readouterr().out


def test_mean_fusion_and_peak_quantile_through_the_cli(toy_root, classifier_ckpt, tmp_path, capsys):
    out = tmp_path / "mean"
    assert _cams(toy_root, classifier_ckpt, out, "--save-layers", "--fusion", "mean", "--peak-quantile", "0.9") == 0
    paper = tmp_path / "paper"
    assert _cams(toy_root, classifier_ckpt, paper, "--save-layers") == 0
    files = sorted(out.glob("*.npz"))
    assert len(files) == len(list(paper.glob("*.npz"))) > 0
    differs = False
    for path in files:
        with np.load(path) as saved, np.load(paper / path.name) as reference:
            if not len(saved["classes"]):
                continue
            # The per-layer maps are stored divided by their 0.9-quantile; the fused map is their
            # mean with stage 3 tanh-scaled, and each layer is the paper's map rescaled and clipped.
            layers = {k: saved[k].astype(np.float32) for k in ("stage3", "stage4", "stage5")}
            expected = (np.tanh(2 * layers["stage3"]) + layers["stage4"] + layers["stage5"]) / 3
            np.testing.assert_allclose(saved["cams"].astype(np.float32), expected, atol=2e-3)
            stage5 = reference["stage5"].astype(np.float32)
            scale = np.quantile(stage5.reshape(len(stage5), -1), 0.9, axis=1)[:, None, None]
            np.testing.assert_allclose(layers["stage5"], np.clip(stage5 / np.where(scale > 0, scale, 1), 0, 1), atol=1e-2)
            differs |= not np.allclose(saved["cams"], reference["cams"], atol=1e-2)
    assert differs, "the options changed nothing"
    for option, value, message in (("--peak-quantile", "0", "--peak-quantile must be in (0, 1]"), ("--peak-quantile", "1.2", "--peak-quantile must be in (0, 1]")):
        assert _cams(toy_root, classifier_ckpt, tmp_path / "bad", option, value) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cams(toy_root, classifier_ckpt, tmp_path / "bad", "--fusion", "sum")


def test_cams_refuses_wrong_checkpoint_and_unknown_layer(toy_root, classifier_ckpt, tmp_path, capsys):
    torch.save({"state_dict": {"model.fc8.weight": torch.zeros(1)}, "hyper_parameters": {}}, tmp_path / "seg.ckpt")
    assert _cams(toy_root, tmp_path / "seg.ckpt", tmp_path / "o") == 2
    assert "not a classifier" in capsys.readouterr().err
    assert _cams(toy_root, classifier_ckpt, tmp_path / "o", "--layers", "stage3,conv9") == 2
    err = capsys.readouterr().err
    assert "conv9" in err and "stage5" in err
    assert _cams(toy_root, classifier_ckpt, tmp_path / "o", "--scaled", "stage1") == 2
    assert "['stage1'] are not among the CAM layers" in capsys.readouterr().err  # this refusal, not any exit 2


def test_image_without_classes_gets_k_zero(toy_root, classifier_ckpt, tmp_path, capsys):
    layout = VOCLayout(toy_root)
    table = {image_id: np.zeros(20, np.float32) for image_id in layout.read_ids("train")}
    np.save(tmp_path / "labels.npy", table, allow_pickle=True)
    assert _cams(toy_root, classifier_ckpt, tmp_path / "o", "--labels", str(tmp_path / "labels.npy")) == 0
    with np.load(next((tmp_path / "o").glob("*.npz"))) as data:
        assert data["cams"].shape[0] == 0 and data["classes"].shape == (0,)
    # PSA: an empty dict, which stores no size; our readers take it from the image
    assert _cams(toy_root, classifier_ckpt, tmp_path / "psa", "--labels", str(tmp_path / "labels.npy"), "--format", "psa") == 0
    path = next((tmp_path / "psa").glob("*.npy"))
    assert np.load(path, allow_pickle=True).item() == {}
    size = read_image(layout.image_path(path.stem)).shape[:2]
    maps, classes = read_cams(path, image_size=size)
    assert maps.shape == (0, *size) and classes.shape == (0,)
    capsys.readouterr()
    assert cli(["pseudo-labels", "--data-root", str(toy_root), "--cams", str(tmp_path / "psa"), "--out", str(tmp_path / "labels"),
                "--split", "train", "--workers", "1"]) == 0
    assert f"{len(table)} written" in capsys.readouterr().out
    assert all(not read_label_png(p).any() for p in (tmp_path / "labels").glob("*.png"))  # all background


def test_predict_needs_gradients_even_under_inference_mode(classifier_ckpt):
    """Lightning predicts under inference_mode by default; the CAM system must still get maps."""
    system = CamPredictor(load_classifier(classifier_ckpt), {"v": CamVariant("layercam", ("stage4", "stage5"), ())})
    image = torch.randn(3, 48, 64)
    batch = {"id": ["a"], "image": [image], "size": [(48, 64)], "multi_hot": torch.eye(20)[[3]]}
    with torch.inference_mode():
        result = system.predict_step(batch, 0)
    cams = result[0]["variants"]["v"]["cams"]
    assert cams.shape == (1, 48, 64) and np.isfinite(cams).all()


def test_every_variant_from_one_pass_writes_the_files_of_separate_runs(toy_root, classifier_ckpt, tmp_path, monkeypatch):
    """What `wsss run` asks for (LayerCAM 3-5 with per-layer maps, Grad-CAM and Grad-CAM++ at
    stage 5) in one make_cams call: byte-identical files to one run per variant, one forward per
    image group instead of three, and a resumed run rewrites nothing."""
    from wsss.stages.cams import make_cams

    variants = {"layercam": CamVariant("layercam", ("stage3", "stage4", "stage5"), ("stage3",), True),
                "gradcam": CamVariant("gradcam", ("stage5",), (), False),
                "gradcampp": CamVariant("gradcam++", ("stage5",), (), False)}
    from wsss.stages.cams import CamOptions

    common = dict(options=CamOptions(num_workers=0, batch_size=3, accelerator="cpu"), split="train", progress=False)
    forwards = []
    real_forward = CamPredictor._view_maps
    monkeypatch.setattr(CamPredictor, "_view_maps", lambda self, *a: forwards.append(1) or real_forward(self, *a))
    together = make_cams(classifier_ckpt, toy_root, {tmp_path / "all" / n: v for n, v in variants.items()}, **common)
    one_pass = len(forwards)
    for name, variant in variants.items():
        make_cams(classifier_ckpt, toy_root, {tmp_path / "alone" / name: variant}, **common)
    assert len(forwards) == 4 * one_pass  # the separate runs took three times the passes
    ids = VOCLayout(toy_root).read_ids("train")
    for name in variants:
        assert together[tmp_path / "all" / name].written == len(ids)
        for image_id in ids:
            assert (tmp_path / "all" / name / f"{image_id}.npz").read_bytes() == (tmp_path / "alone" / name / f"{image_id}.npz").read_bytes()
    # Resume: one folder lost two files; only those are written again, the rest are kept as they are.
    (tmp_path / "all" / "gradcam" / f"{ids[0]}.npz").unlink()
    (tmp_path / "all" / "gradcam" / f"{ids[1]}.npz").unlink()
    again = make_cams(classifier_ckpt, toy_root, {tmp_path / "all" / n: v for n, v in variants.items()}, **common)
    assert again[tmp_path / "all" / "gradcam"].written == 2 and again[tmp_path / "all" / "layercam"].written == 0
    assert again[tmp_path / "all" / "layercam"].skipped == len(ids)
    assert (tmp_path / "all" / "gradcam" / f"{ids[0]}.npz").read_bytes() == (tmp_path / "alone" / "gradcam" / f"{ids[0]}.npz").read_bytes()


def test_channels_last_runs_the_classifier_in_nhwc_and_gives_the_same_maps(toy_root, classifier_ckpt, tmp_path, monkeypatch):
    """`wsss cams --channels-last`: every forward sees NHWC inputs and weights; the files hold the
    contiguous run's maps up to float rounding: NHWC kernels sum in another order, which a
    near-cancelling gradient cell turns into a local ~1% change (0.011 on stage 3 on an AVX-only
    CPU, 0 elsewhere), so the bound is on the mean with a loose cap on the worst pixel."""
    import wsss.systems.predictors as predictors

    formats = []
    real = predictors.compute_cam_sets

    def recording(model, images, *args):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        formats.append((images.is_contiguous(memory_format=torch.channels_last) and images.shape[-1] > 1,
                        conv.weight.is_contiguous(memory_format=torch.channels_last)))
        return real(model, images, *args)

    monkeypatch.setattr(predictors, "compute_cam_sets", recording)
    assert _cams(toy_root, classifier_ckpt, tmp_path / "nchw", "--save-layers") == 0
    assert formats and not any(any(f) for f in formats)
    formats.clear()
    assert _cams(toy_root, classifier_ckpt, tmp_path / "nhwc", "--save-layers", "--channels-last") == 0
    assert formats and all(all(f) for f in formats)
    for path in sorted((tmp_path / "nchw").glob("*.npz")):
        with np.load(path) as a, np.load(tmp_path / "nhwc" / path.name) as b:
            assert a.files == b.files
            for key in a.files:
                difference = np.abs(a[key].astype(np.float32) - b[key].astype(np.float32))
                assert difference.mean() <= 5e-4 and difference.max() <= 0.05, (path.name, key, difference.mean(), difference.max())


def _image_tensor(layout, image_id):
    return eval_transform()(*to_tv(read_image(layout.image_path(image_id))))[None]


@pytest.mark.parametrize("options", [
    {},
    {"fusion": "mean", "peak_quantile": 0.9},
    {"scales": (1.0, 0.5), "flip": True},
])
def test_python_api_gives_the_files_of_the_cli(toy_root, classifier_ckpt, tmp_path, options):
    """wsss.cams.LayerCAM with the CLI's options: its fused and per-layer maps are the files' maps
    (the same float32 maps, so the same float16 bits)."""
    from wsss.cams import LayerCAM

    flags = {"fusion": ["--fusion", str(options.get("fusion"))], "peak_quantile": ["--peak-quantile", str(options.get("peak_quantile"))],
             "scales": ["--scales", ",".join(map(str, options.get("scales", ())))], "flip": ["--flip"]}
    out = tmp_path / "cams"
    assert _cams(toy_root, classifier_ckpt, out, "--save-layers", *[arg for key in options for arg in flags[key]]) == 0
    layout = VOCLayout(toy_root)
    model = load_classifier(classifier_ckpt)
    cam = LayerCAM(model, ["stage3", "stage4", "stage5"], scaled_layers=["stage3"], **options)
    compared = 0
    for image_id in layout.read_ids("train")[:4]:
        with np.load(out / f"{image_id}.npz") as saved:
            result = cam(_image_tensor(layout, image_id), [list(saved["classes"] - 1)])
            assert saved["cams"].shape == result.fused[0].shape
            np.testing.assert_array_equal(saved["cams"], result.fused[0].numpy().astype(np.float16))
            for layer in ("stage3", "stage4", "stage5"):
                np.testing.assert_array_equal(saved[layer], result.layers[layer][0].numpy().astype(np.float16))
            compared += len(saved["classes"])
    assert compared > 0


def test_cams_of_a_torchvision_classifier_through_the_cli(toy_root, tmp_path, capsys):
    """--model torchvision:resnet18 --weights FILE: the maps of the file's classes (label value v)
    are the API's maps of output v - 1; a head of another size is refused, naming the file."""
    import torchvision

    from wsss.cams import LayerCAM

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=20).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18.pt")
    out = tmp_path / "cams"
    common = ["--model", "torchvision:resnet18", "--data-root", str(toy_root), "--split", "train", "--num-workers", "0", "--accelerator", "cpu"]
    assert cli(["cams", *common, "--weights", str(tmp_path / "resnet18.pt"), "--out", str(out), "--layers", "layer3,layer4",
                "--scaled", "layer3", "--save-layers"]) == 0
    layout, labels = VOCLayout(toy_root), ImageLabels(VOCLayout(toy_root))
    cam = LayerCAM(model, [model.layer3, model.layer4], scaled_layers=[model.layer3])
    for image_id in layout.read_ids("train")[:3]:
        with np.load(out / f"{image_id}.npz") as saved:
            classes = np.flatnonzero(labels(image_id))
            np.testing.assert_array_equal(saved["classes"], classes + 1)
            result = cam(_image_tensor(layout, image_id), [list(classes)])
            np.testing.assert_array_equal(saved["cams"], result.fused[0].numpy().astype(np.float16))
            np.testing.assert_array_equal(saved["layer4"], result.layers["layer4"][0].numpy().astype(np.float16))
    capsys.readouterr()
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), tmp_path / "ten.pt")
    assert cli(["cams", *common, "--weights", str(tmp_path / "ten.pt"), "--out", str(tmp_path / "o"), "--layers", "layer4"]) == 2
    err = capsys.readouterr().err
    assert "ten.pt" in err and "'fc.weight' has 10 outputs; 20 are needed" in err and "class k+1 of the dataset" in err
    assert cli(["cams", *common, "--out", str(tmp_path / "o"), "--layers", "layer4"]) == 2
    assert "needs --weights" in capsys.readouterr().err
    assert cli(["cams", *common, "--weights", str(tmp_path / "resnet18.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "needs --layers" in capsys.readouterr().err
    assert cli(["cams", *common, "--weights", str(tmp_path / "resnet18.pt"), "--out", str(tmp_path / "o"), "--layers", "layer4.1.relu"]) == 2
    assert "enclosing block 'layer4.1'" in capsys.readouterr().err
    other = [arg.replace("torchvision:resnet18", "torchvision:resnet34") for arg in common]
    assert cli(["cams", *other, "--weights", str(tmp_path / "resnet18.pt"), "--out", str(tmp_path / "o"), "--layers", "layer4"]) == 2
    assert "not the weights of torchvision's resnet34" in capsys.readouterr().err
    torch.save(torchvision.models.vit_b_32(weights=None, num_classes=20).state_dict(), tmp_path / "vit.pt")
    vit = [arg.replace("torchvision:resnet18", "torchvision:vit_b_32") for arg in common]
    assert cli(["cams", *vit, "--weights", str(tmp_path / "vit.pt"), "--out", str(tmp_path / "o"), "--layers", "encoder.ln"]) == 2
    assert "224x224" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.npz"))
