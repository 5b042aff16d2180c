"""Project settings that tests depend on."""
from __future__ import annotations

import warnings
from pathlib import Path


def _action_for(category: type[Warning], module: str, message: str = "") -> str:
    """What the warning filters active in this test (Python's, pytest's, pyproject's) do with a warning."""
    for action, text, filter_category, filter_module, _ in warnings.filters:
        if (text is None or text.match(message)) and issubclass(category, filter_category) and (filter_module is None or filter_module.match(module)):
            return action
    return warnings.defaultaction


def test_pyproject_ignores_only_the_deprecation_warnings_it_names():
    """A DeprecationWarning from our code or a library we call must reach the test report; only
    Lightning's CLI's (its use of deprecated jsonargparse APIs) are ignored."""
    for module in ("wsss.cams", "torch.nn.functional", "numpy"):
        assert _action_for(DeprecationWarning, module) != "ignore", module
    assert _action_for(DeprecationWarning, "pytorch_lightning.cli") == "ignore"


def test_importing_wsss_turns_off_onednns_per_shape_cache_unless_the_user_set_it():
    """oneDNN keeps primitives for every input shape (memory grew with the number of VOC photos);
    the setting must be in the environment before the first convolution, so `import wsss` sets it."""
    import os
    import subprocess
    import sys

    show = "import torch, wsss, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    assert subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True).stdout.strip() == "0"
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "256"
    assert subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True).stdout.strip() == "256"


def test_readme_stage_options_are_generated_from_the_option_classes():
    """The README's table of stage options is what scripts/stage_reference.py makes of the
    dataclasses the commands and `wsss run` build (one source for both)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "scripts" / "stage_reference.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
