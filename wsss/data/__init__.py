"""Data layer: VOC and COCO layouts, labels, paired transforms, datasets, the toy datasets."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TOY = "toy"  # data-root value meaning "the built-in toy dataset"


def toy_dataset_dir() -> Path:
    """Where ``root: toy`` lives: $WSSS_TOY_DIR, else ~/.cache/wsss/toy_voc."""
    return Path(os.environ.get("WSSS_TOY_DIR", Path.home() / ".cache" / "wsss" / "toy_voc"))


def resolve_data_root(root: str | Path) -> Path:
    """Map ``"toy"`` to the built-in toy dataset (generated on first use), anything else to a Path."""
    if str(root) != TOY:
        return Path(root).expanduser()
    target = toy_dataset_dir()
    if not (target / ".complete").exists():
        from wsss.data.toy import make_toy_voc

        target.parent.mkdir(parents=True, exist_ok=True)
        # Generate beside the target and rename, so concurrent processes never see half a dataset.
        staging = Path(tempfile.mkdtemp(prefix=".toy_voc.", dir=target.parent))
        make_toy_voc(staging)
        (staging / ".complete").touch()
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def open_layout(root: str | Path, mask_dir: str | Path | None = None):
    """The dataset at ``root`` (``toy`` included): a COCO 2014 layout (:class:`wsss.data.coco.COCOLayout`)
    when it holds COCO's train2014/ or val2014/ image folders, else a VOC layout (:class:`wsss.data.voc.VOCLayout`)."""
    from wsss.data.coco import COCOLayout, is_coco_layout
    from wsss.data.voc import VOCLayout

    path = resolve_data_root(root)
    return COCOLayout(path, mask_dir) if path.is_dir() and is_coco_layout(path) else VOCLayout(path, mask_dir)
