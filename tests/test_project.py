"""Project settings that tests depend on."""
from __future__ import annotations

import warnings


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
