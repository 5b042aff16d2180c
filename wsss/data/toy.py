"""A small synthetic dataset in the VOC layout, generated from a seed in seconds.

Each image holds 1-4 objects of 1-3 of six VOC classes on a cluttered background. A class has a
hue band, a texture and a shape with thin parts (limbs, wings, stems, tails), so a small CNN learns
to recognise the classes within a minute or two on a CPU, while recovering the thin parts and
separating touching objects keeps localisation non-trivial.
"""
from __future__ import annotations

import colorsys
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from wsss.classes import CLASS_NAMES, IGNORE_INDEX
from wsss.formats.label_png import write_label_png
from wsss.io import atomic_path

# label value -> (hue in degrees, texture)
TOY_CLASSES: dict[int, tuple[float, str]] = {
    CLASS_NAMES.index("car") + 1: (0.0, "hstripes"),
    CLASS_NAMES.index("bird") + 1: (55.0, "plain"),
    CLASS_NAMES.index("pottedplant") + 1: (120.0, "dots"),
    CLASS_NAMES.index("aeroplane") + 1: (185.0, "plain"),
    CLASS_NAMES.index("person") + 1: (235.0, "vstripes"),
    CLASS_NAMES.index("cat") + 1: (300.0, "dots"),
}
MIN_VISIBLE_PIXELS = 30  # an object occluded below this does not count towards the image's labels


def _shape_person(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, rng: np.random.Generator) -> None:
    limb = max(2, round(0.07 * s))
    draw.ellipse([cx - 0.12 * s, cy - 0.5 * s, cx + 0.12 * s, cy - 0.26 * s], fill=255)
    draw.ellipse([cx - 0.15 * s, cy - 0.28 * s, cx + 0.15 * s, cy + 0.15 * s], fill=255)
    for side in (-1, 1):
        draw.line([cx, cy + 0.1 * s, cx + side * rng.uniform(0.08, 0.2) * s, cy + 0.5 * s], fill=255, width=limb)
        draw.line([cx + side * 0.1 * s, cy - 0.2 * s, cx + side * rng.uniform(0.3, 0.45) * s, cy + rng.uniform(-0.3, 0.1) * s], fill=255, width=limb)


def _shape_aeroplane(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, rng: np.random.Generator) -> None:
    draw.ellipse([cx - 0.5 * s, cy - 0.08 * s, cx + 0.5 * s, cy + 0.08 * s], fill=255)
    sweep = rng.uniform(0.05, 0.2) * s
    for side in (-1, 1):
        draw.polygon([(cx - 0.08 * s, cy), (cx + 0.08 * s, cy), (cx - sweep, cy + side * 0.45 * s)], fill=255)
    draw.polygon([(cx - 0.5 * s, cy), (cx - 0.38 * s, cy), (cx - 0.5 * s, cy - 0.22 * s)], fill=255)


def _shape_bird(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, rng: np.random.Generator) -> None:
    leg = max(2, round(0.04 * s))
    draw.ellipse([cx - 0.25 * s, cy - 0.13 * s, cx + 0.22 * s, cy + 0.15 * s], fill=255)
    draw.ellipse([cx + 0.12 * s, cy - 0.3 * s, cx + 0.32 * s, cy - 0.1 * s], fill=255)
    draw.polygon([(cx + 0.3 * s, cy - 0.23 * s), (cx + 0.48 * s, cy - 0.19 * s), (cx + 0.3 * s, cy - 0.15 * s)], fill=255)
    draw.polygon([(cx - 0.2 * s, cy - 0.05 * s), (cx - 0.5 * s, cy - rng.uniform(0.0, 0.25) * s), (cx - 0.45 * s, cy + 0.1 * s)], fill=255)
    for dx in (-0.05, 0.07):
        draw.line([cx + dx * s, cy + 0.12 * s, cx + dx * s, cy + 0.45 * s], fill=255, width=leg)


def _shape_car(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, rng: np.random.Generator) -> None:
    draw.rectangle([cx - 0.48 * s, cy - 0.08 * s, cx + 0.48 * s, cy + 0.16 * s], fill=255)
    draw.polygon([(cx - 0.28 * s, cy - 0.08 * s), (cx - 0.15 * s, cy - 0.3 * s), (cx + 0.2 * s, cy - 0.3 * s), (cx + 0.32 * s, cy - 0.08 * s)], fill=255)
    for wx in (-0.3, 0.3):
        draw.ellipse([cx + (wx - 0.11) * s, cy + 0.06 * s, cx + (wx + 0.11) * s, cy + 0.28 * s], fill=255)
    draw.line([cx - 0.1 * s, cy - 0.3 * s, cx - 0.25 * s, cy - 0.55 * s], fill=255, width=max(2, round(0.03 * s)))


def _shape_cat(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, rng: np.random.Generator) -> None:
    draw.ellipse([cx - 0.3 * s, cy - 0.1 * s, cx + 0.2 * s, cy + 0.22 * s], fill=255)
    draw.ellipse([cx + 0.1 * s, cy - 0.32 * s, cx + 0.38 * s, cy - 0.04 * s], fill=255)
    for ex in (0.14, 0.28):
        draw.polygon([(cx + ex * s, cy - 0.27 * s), (cx + (ex + 0.09) * s, cy - 0.27 * s), (cx + (ex + 0.03) * s, cy - 0.45 * s)], fill=255)
    # A thin curled tail: a short polyline with a random curl.
    curl = rng.uniform(-1.0, 1.0)
    points = [(cx - 0.28 * s - 0.2 * s * t, cy + 0.05 * s - 0.35 * s * t + curl * 0.12 * s * math.sin(3 * t)) for t in np.linspace(0, 1, 8)]
    draw.line(points, fill=255, width=max(2, round(0.05 * s)), joint="curve")
    for lx in (-0.2, 0.1):
        draw.line([cx + lx * s, cy + 0.15 * s, cx + lx * s, cy + 0.42 * s], fill=255, width=max(2, round(0.06 * s)))


def _shape_pottedplant(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, rng: np.random.Generator) -> None:
    draw.polygon([(cx - 0.2 * s, cy + 0.15 * s), (cx + 0.2 * s, cy + 0.15 * s), (cx + 0.14 * s, cy + 0.5 * s), (cx - 0.14 * s, cy + 0.5 * s)], fill=255)
    for _ in range(int(rng.integers(3, 6))):
        angle = rng.uniform(-0.9, 0.9)
        length = rng.uniform(0.35, 0.6) * s
        tip = (cx + length * math.sin(angle), cy + 0.15 * s - length * math.cos(angle))
        draw.line([cx, cy + 0.15 * s, *tip], fill=255, width=max(2, round(0.035 * s)))
        leaf = rng.uniform(0.06, 0.1) * s
        draw.ellipse([tip[0] - leaf, tip[1] - leaf * 0.6, tip[0] + leaf, tip[1] + leaf * 0.6], fill=255)


SHAPES = {
    CLASS_NAMES.index("person") + 1: _shape_person,
    CLASS_NAMES.index("aeroplane") + 1: _shape_aeroplane,
    CLASS_NAMES.index("bird") + 1: _shape_bird,
    CLASS_NAMES.index("car") + 1: _shape_car,
    CLASS_NAMES.index("cat") + 1: _shape_cat,
    CLASS_NAMES.index("pottedplant") + 1: _shape_pottedplant,
}


def _rgb(hue_deg: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_deg % 360) / 360, saturation, value), dtype=np.float32) * 255


def _texture(label: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An (H, W, 3) float canvas in the class's colour band and pattern."""
    hue, pattern = TOY_CLASSES[label]
    hue += rng.uniform(-15, 15)
    base = _rgb(hue, rng.uniform(0.55, 0.9), rng.uniform(0.55, 0.95))
    accent = _rgb(hue, rng.uniform(0.3, 0.6), rng.uniform(0.25, 0.5))
    yy, xx = np.mgrid[0:height, 0:width]
    period = rng.integers(4, 8)
    if pattern == "hstripes":
        on = (yy // period) % 2 == 0
    elif pattern == "vstripes":
        on = (xx // period) % 2 == 0
    elif pattern == "dots":
        on = ((yy % (2 * period)) < period // 2 + 1) & ((xx % (2 * period)) < period // 2 + 1)
    else:
        on = np.zeros((height, width), dtype=bool)
    return np.where(on[..., None], accent, base)


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Low-saturation gradient with clutter: rectangles, ellipses and lines of any hue."""
    top, bottom = _rgb(rng.uniform(0, 360), rng.uniform(0, 0.2), rng.uniform(0.3, 0.8)), _rgb(rng.uniform(0, 360), rng.uniform(0, 0.2), rng.uniform(0.3, 0.8))
    ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    canvas = Image.fromarray(np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 14))):
        colour = tuple(int(c) for c in _rgb(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.2, 0.9)))
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * width, y0 + rng.uniform(0.05, 0.5) * height
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(canvas, dtype=np.float32)


def render_toy_image(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 mask (0 background, 255 object borders)."""
    image = _background(height, width, rng)
    mask = np.zeros((height, width), dtype=np.uint8)
    classes = list(TOY_CLASSES)
    chosen = rng.choice(classes, size=int(rng.integers(1, 4)), replace=False)
    objects = list(chosen) + list(rng.choice(chosen, size=int(rng.integers(0, 2))))
    for label in objects:
        size = rng.uniform(0.3, 0.75) * min(height, width)
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.25, 0.75) * height
        silhouette = Image.new("L", (width, height), 0)
        SHAPES[int(label)](ImageDraw.Draw(silhouette), cx, cy, size, rng)
        if rng.random() < 0.5:
            silhouette = silhouette.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        inside = np.asarray(silhouette) > 127
        image[inside] = _texture(int(label), height, width, rng)[inside]
        mask[inside] = label
    # Soft edges and sensor noise, so boundaries are not trivially colour steps.
    image = np.asarray(Image.fromarray(image.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)
    image = (image + rng.normal(0, 6, image.shape)).clip(0, 255).astype(np.uint8)
    # VOC marks object outlines as "ignore": background pixels touching an object become 255.
    padded = np.pad(mask, 1, mode="edge")
    touches = np.zeros_like(mask, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        touches |= padded[dy:dy + height, dx:dx + width] != mask
    mask[(mask == 0) & touches] = IGNORE_INDEX
    return image, mask


def _annotation_xml(image_id: str, width: int, height: int, classes: list[int]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for value in classes:
        ET.SubElement(ET.SubElement(root, "object"), "name").text = CLASS_NAMES[value - 1]
    return ET.tostring(root)


def make_toy_voc(
    out: str | Path,
    seed: int = 0,
    num_train: int = 160,
    num_val: int = 40,
    num_train_subset: int = 60,
    size_range: tuple[int, int] = (96, 128),
    annotations: bool = True,
) -> Path:
    """Write a toy VOC2012-layout dataset under ``out`` and return its root.

    Lists: ``train_aug`` (``num_train`` images), ``train`` (its first ``num_train_subset``, as
    VOC's train is a subset of train_aug) and ``val``. Masks go to SegmentationClassAug and
    SegmentationClass; ``annotations`` also writes Annotations/<id>.xml with the visible classes.
    """
    root = Path(out)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation", "Annotations"):
        if sub != "Annotations" or annotations:
            (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"toy_{index:05d}" for index in range(num_train + num_val)]
    for image_id in ids:
        height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        image, mask = render_toy_image(rng, height, width)
        with atomic_path(root / "JPEGImages" / f"{image_id}.jpg", ".jpg") as tmp:
            Image.fromarray(image).save(tmp, format="JPEG", quality=90)
        write_label_png(root / "SegmentationClassAug" / f"{image_id}.png", mask)
        write_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        if annotations:
            values, counts = np.unique(mask, return_counts=True)
            visible = [int(v) for v, n in zip(values, counts) if 0 < v < IGNORE_INDEX and n >= MIN_VISIBLE_PIXELS]
            (root / "Annotations" / f"{image_id}.xml").write_bytes(_annotation_xml(image_id, width, height, visible))
    lists = {"train_aug": ids[:num_train], "train": ids[:num_train_subset], "val": ids[num_train:]}
    for name, members in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(members) + "\n")
    return root


# The toy classes under their COCO names (VOC spells three of them otherwise).
VOC_TO_COCO_NAME = {"aeroplane": "airplane", "pottedplant": "potted plant"}


def make_toy_coco(out: str | Path, seed: int = 0, num_train: int = 120, num_val: int = 40, size_range: tuple[int, int] = (96, 128)) -> Path:
    """Write the toy images in the COCO 2014 WSSS layout (:mod:`wsss.data.coco`) under ``out``.

    The same scenes as :func:`make_toy_voc`, their classes relabelled with COCO's values (person 1,
    car 3, airplane 5, bird 15, cat 16, potted plant 59): ``train2014/`` and ``val2014/`` images
    named as COCO names them, masks in ``SegmentationClass/<folder>/``, the image-level table
    ``cls_labels_coco.npy`` (a pickled dict id -> float32[80], as the COCO WSSS tables are saved)
    and the lists ``ImageSets/train2014.txt``, ``ImageSets/val2014.txt``.
    """
    from wsss.classes import COCO_CLASS_NAMES

    root = Path(out)
    coco_value = np.zeros(256, np.uint8)
    coco_value[IGNORE_INDEX] = IGNORE_INDEX
    for value in TOY_CLASSES:
        name = CLASS_NAMES[value - 1]
        coco_value[value] = COCO_CLASS_NAMES.index(VOC_TO_COCO_NAME.get(name, name)) + 1
    rng = np.random.default_rng(seed)
    table, lists = {}, {}
    for folder, count, first in (("train2014", num_train, 9), ("val2014", num_val, 42)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / "SegmentationClass" / folder).mkdir(parents=True, exist_ok=True)
        ids = [f"COCO_{folder}_{first + 7 * index:012d}" for index in range(count)]
        for image_id in ids:
            height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
            image, mask = render_toy_image(rng, height, width)
            mask = coco_value[mask]
            with atomic_path(root / folder / f"{image_id}.jpg", ".jpg") as tmp:
                Image.fromarray(image).save(tmp, format="JPEG", quality=90)
            write_label_png(root / "SegmentationClass" / folder / f"{image_id}.png", mask)
            values, counts = np.unique(mask, return_counts=True)
            row = np.zeros(len(COCO_CLASS_NAMES), np.float32)
            row[[int(v) - 1 for v, n in zip(values, counts) if 0 < v < IGNORE_INDEX and n >= MIN_VISIBLE_PIXELS]] = 1
            table[image_id] = row
        lists[folder] = ids
    np.save(root / "cls_labels_coco.npy", table, allow_pickle=True)
    (root / "ImageSets").mkdir(exist_ok=True)
    for name, members in lists.items():
        (root / "ImageSets" / f"{name}.txt").write_text("\n".join(members) + "\n")
    return root
