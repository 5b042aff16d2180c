"""Shared fixtures: a small toy dataset in the real VOC layout, generated once per session."""
from __future__ import annotations

import os
import warnings

import pytest

# Tests never touch the user's toy-dataset cache.
os.environ.setdefault("WSSS_TOY_DIR", os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), f"wsss-test-toy-{os.getpid()}"))
# Training configs without trainer.precision run fp32 here (and in every subprocess), whatever the
# CPU: the default would be bf16 on CPUs with bf16 instructions (wsss.trainers.default_precision).
os.environ.setdefault("WSSS_DEFAULT_PRECISION", "32-true")
warnings.filterwarnings("ignore", message="VGG16 weights='none'")


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A 32-image toy VOC2012 folder: train_aug 24 (train = first 12), val 8."""
    from wsss.data.toy import make_toy_voc

    return make_toy_voc(tmp_path_factory.mktemp("toy") / "VOC2012", seed=1, num_train=24, num_val=8, num_train_subset=12)
