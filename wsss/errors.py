"""User-facing errors: the CLI prints their message (which names the file and the problem) and exits 2."""


class WsssError(Exception):
    """Base class of errors that are the user's to fix, not bugs."""


class DataError(WsssError):
    """A dataset, list, image, mask or CAM file is missing or malformed."""


class WeightsError(WsssError):
    """Weights or a checkpoint cannot be loaded (missing, wrong model, unsafe)."""


class ConfigError(WsssError):
    """An option or configuration value is invalid."""
