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


def test_onednns_per_shape_cache_is_the_commands_setting_not_an_import_side_effect():
    """oneDNN keeps primitives for every input shape (memory grew with the number of VOC photos), so
    the `wsss` commands turn the cache off, unless the user set it; importing wsss (the CAM engine
    included) leaves another program's environment as it was."""
    import os
    import subprocess
    import sys

    imports = "import os, torch, wsss, wsss.cams, wsss.stages.cams; print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))"
    command = ("import os, contextlib\nfrom wsss.cli import main\nwith contextlib.suppress(SystemExit), contextlib.redirect_stdout(None):\n"
               "    main(['check-data', '--help'])\nprint(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))")
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}

    def shown(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()

    assert shown(imports) == "None"
    assert shown(command) == "0"
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "256"
    assert shown(imports) == shown(command) == "256"


def test_readme_stage_options_are_generated_from_the_option_classes():
    """The README's table of stage options is what scripts/stage_reference.py makes of the
    dataclasses the commands and `wsss run` build (one source for both)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "scripts" / "stage_reference.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
