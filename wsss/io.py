"""File plumbing shared by every stage: safe reads with clear errors, atomic writes."""
from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.classes import IGNORE_INDEX, NUM_LABELS, voc_palette
from wsss.errors import DataError, OutputError

# Refuse images whose decoded size would take more than this many pixels (~ 8k x 8k is 64 MP);
# PIL's own bomb check only warns below 179 MP.
MAX_IMAGE_PIXELS = 40_000_000


@functools.cache
def _umask() -> int:
    """The process umask, read once per process (outputs get 0666 less it).

    Linux reports it in /proc/self/status. Elsewhere the only way to read it is to set it and put
    it back, which is process-wide and races with other threads creating files: done once, on the
    first atomic write, never again. A umask changed later in the process is not seen.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temporary files are ``.<name>.<random>.<host>-<pid>.tmp<suffix>``: hidden, never named like an
# output, and tagged with their writer so a later run can tell an orphan from a file in progress.
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.tmp(\.[A-Za-z0-9]+)?$")
_swept_folders: set[Path] = set()


def is_temp_file(name: str) -> bool:
    """True for the name of an :func:`atomic_path` temporary file (never an output)."""
    return _TEMP_NAME.match(name) is not None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete the :func:`atomic_path` temporary files in ``folder`` whose writer is dead; returns how many.

    Only files written from this host by a process that no longer exists are touched (SIGKILL,
    power loss), so the temporary files of writers still running (other DDP ranks or workers
    writing into the same folder) are left alone. Files from other hosts of a shared filesystem
    are kept: their writers cannot be checked from here.
    """
    if os.name != "posix":
        return 0
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["host"] != _HOST or int(match["pid"]) <= 0 or _process_exists(int(match["pid"])):
            continue
        Path(entry.path).unlink(missing_ok=True)
        removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it over ``final`` only if the block succeeds.

    Readers therefore see either no file or a complete one, even after SIGKILL. A SIGKILL leaves
    the temporary file behind; the first write into a folder by a later process removes such
    orphans (:func:`remove_stale_temp_files`). ``suffix`` lets writers that insist on an
    extension (``np.savez`` adds ``.npz``) keep it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.parent not in _swept_folders:
        remove_stale_temp_files(final.parent)
        _swept_folders.add(final.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".{_HOST}-{os.getpid()}.tmp{suffix}", dir=final.parent)
    os.close(fd)
    # mkstemp creates 0600 files; outputs should get the permissions any new file gets (0666 less the
    # umask), or colleagues sharing a results folder could not read them.
    os.chmod(tmp_name, 0o666 & ~_umask())
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ImageInfo(NamedTuple):
    """What an image file's header says, read without decoding a pixel."""

    height: int
    width: int
    mode: str


def _open_header(path: Path) -> Image.Image:
    """``Image.open`` (header only) with the checks every image reader shares: the file exists, is
    not empty, is an image, and is at most MAX_IMAGE_PIXELS, refused before any pixel is decoded."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty (0 bytes)")
        image = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image is larger than the {MAX_IMAGE_PIXELS:,} pixels this pipeline accepts ({exc}); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        image.close()
        raise DataError(
            f"{path}: image is {image.width}x{image.height}, more than the {MAX_IMAGE_PIXELS:,} pixels "
            "this pipeline accepts; downscale it first"
        )
    return image


def _decode(image: Image.Image, path: Path) -> Image.Image:
    try:
        image.load()  # decode now so truncation is reported here, not deep inside a transform
    except Exception as exc:  # any decoder failure (OSError, SyntaxError, zlib.error, ...) is this file's fault
        raise DataError(f"{path}: unreadable or truncated image ({type(exc).__name__}: {exc})") from None
    return image


def image_info(path: str | Path) -> ImageInfo:
    """Size and mode of an image from its header alone, with the same checks and errors as
    :func:`read_image` (empty, unreadable, too large), for size look-ups that must not decode."""
    path = Path(path)
    with _open_header(path) as image:
        return ImageInfo(image.height, image.width, image.mode)


def _is_deeper_than_8_bits(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;")


def read_image(path: str | Path) -> np.ndarray:
    """RGB image as (H, W, 3) uint8; grayscale, CMYK, palette and RGBA images are converted.

    16-bit and floating-point images are refused: PIL's conversion to RGB clips them to white or
    black, which would be a silently wrong input.
    """
    path = Path(path)
    image = _open_header(path)
    if _is_deeper_than_8_bits(image.mode):
        image.close()
        raise DataError(f"{path}: mode {image.mode} image (more than 8 bits per sample) is not supported; convert it to 8-bit RGB first")
    image = _decode(image, path)
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")  # RGBA: alpha dropped; CMYK/L/P: colour-converted
        except ValueError as exc:  # modes PIL cannot convert (LAB, HSV)
            raise DataError(f"{path}: cannot convert a mode {image.mode} image to RGB ({exc})") from None
    return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def read_label_png(path: str | Path, check_values: bool = True) -> np.ndarray:
    """Label map (index or palette PNG) as (H, W) uint8, values 0..20 or 255.

    Palette PNGs are read by index (their colours are ignored); an RGB PNG is refused because
    its colours would have to be guessed back into labels.
    """
    path = Path(path)
    image = _open_header(path)
    if image.mode not in ("P", "L", "I", "I;16"):
        image.close()
        raise DataError(f"{path}: label PNG must be a palette or single-channel image, got mode {image.mode}")
    labels = np.asarray(_decode(image, path))
    if check_values:
        bad = np.setdiff1d(np.unique(labels), [*range(NUM_LABELS), IGNORE_INDEX])
        if bad.size:
            raise DataError(f"{path}: label values outside 0..{NUM_LABELS - 1} and {IGNORE_INDEX}: {bad[:10].tolist()}")
    elif labels.dtype != np.uint8:
        # 16/32-bit modes: a value that does not fit in uint8 would wrap silently (300 -> 44).
        bad = np.unique(labels[(labels < 0) | (labels > 255)])
        if bad.size:
            raise DataError(f"{path}: label values outside 0..255: {bad[:10].tolist()}")
    return labels.astype(np.uint8)


def check_mask_size(mask_path: str | Path, mask_shape: tuple[int, ...], image_path: str | Path, image_shape: tuple[int, ...]) -> None:
    """DataError naming the mask unless its (H, W) is its image's: masks are never resized to fit,
    since a mask of another size almost always belongs to another image."""
    (mask_h, mask_w), (image_h, image_w) = tuple(mask_shape[:2]), tuple(image_shape[:2])
    if (mask_h, mask_w) != (image_h, image_w):
        raise DataError(f"{mask_path}: mask is {mask_w}x{mask_h} but its image {image_path} is {image_w}x{image_h}")


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """Write a (H, W) uint8 label map as a VOC-palette PNG, atomically."""
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(voc_palette())
    with atomic_path(path, ".png") as tmp:
        image.save(tmp, format="PNG")


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically; NumPy scalars and arrays become numbers and lists."""
    import json

    def plain(value):
        if hasattr(value, "tolist"):  # NumPy scalars and arrays, torch tensors
            return value.tolist()
        return str(value)

    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=plain) + "\n", encoding="utf-8")


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write arrays to ``path`` (a ``.npz``), atomically.

    Deterministic, so runs can be compared file by file: ``np.savez`` writes each entry through
    ``ZipFile.open(name, "w")``, which stamps the fixed date 1980-01-01, never the current time.
    """
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **arrays)


def write_irn_cams(path: str | Path, keys: np.ndarray, high_res: np.ndarray) -> None:
    """Write one image's maps in IRN's ``make_cam.py`` layout to ``path`` (a ``.npy``), atomically:
    the pickled dict ``{"keys": (K,) int64 0-based class indices, "high_res": (K, H, W) float32}``,
    which IRN's later steps read with ``np.load(path, allow_pickle=True).item()``."""
    cams = {"keys": np.asarray(keys, dtype=np.int64), "high_res": np.asarray(high_res, dtype=np.float32)}
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, cams, allow_pickle=True)


def is_valid_npz(path: Path, keys: tuple[str, ...]) -> bool:
    """True when ``path`` is a complete .npz holding ``keys`` (used to skip finished work)."""
    try:
        with np.load(path) as data:
            return all(key in data.files for key in keys)
    except Exception:
        return False


def is_valid_npy_dict(path: Path, keys: tuple[str, ...]) -> bool:
    """True when ``path`` is a complete ``.npy`` holding a pickled dict with ``keys`` (IRN's layout),
    read with :func:`load_pickled_npy` since the folder may hold anyone's files."""
    try:
        value = load_pickled_npy(path)
    except DataError:
        return False
    return isinstance(value, dict) and all(key in value for key in keys)


def _why_not_writable(folder: Path) -> str | None:
    """None if a file can be written in ``folder`` (or, while it does not exist, in its deepest
    existing ancestor, where it would be created); else why not. Creates nothing."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)
    except OSError as exc:
        return f"{existing}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(probe)
    return None


def ensure_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Prove that files can be written in ``path`` (it may not exist yet), so that a stage fails
    at once with a message naming the folder, not when it first saves after hours of work."""
    path = Path(path).expanduser()
    reason = _why_not_writable(path)
    if reason is not None:
        raise OutputError(f"cannot write to {what} {path}: {reason}")
    return path


def ensure_output_file(path: str | Path, what: str = "output file") -> Path:
    """:func:`ensure_output_dir` for the folder of an output file (which must not be a folder)."""
    path = Path(path).expanduser()
    reason = "it is a folder" if path.is_dir() else _why_not_writable(path.parent)
    if reason is not None:
        raise OutputError(f"cannot write {what} {path}: {reason}")
    return path


def _latin1_bytes(text, encoding):
    """``_codecs.encode`` as protocol-2 pickles use it: Python 3 writes bytes for Python 2 readers as
    ``_codecs.encode(<the bytes as latin-1 text>, 'latin1')``. Any other codec or argument is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing to load _codecs.encode({type(text).__name__}, {encoding!r}): only (str, 'latin1') is allowed")
    return text.encode("latin-1")


def _empty_bytes():
    """``bytes()`` with no argument: how protocol 2 writes ``b""`` (the data of an empty array)."""
    return b""


def _refused_global(exc: Exception) -> str:
    """`` (module.name)`` of the global torch's weights-only unpickler refused, from its page-long message."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    return f" ({found[1]})" if found else ""


def _storage_from_bytes(data):
    """Stands in for ``torch.storage._load_from_bytes``, which unpickles a pickled tensor's storage
    with ``weights_only=False`` (so could run code): here only tensors and plain containers load."""
    import torch

    if not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refusing to load torch.storage._load_from_bytes({type(data).__name__}): bytes expected")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"refusing to load a pickled torch storage holding objects other than tensors{_refused_global(exc)}") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for foreign ``.npy`` files (IRN's dicts) that rebuilds dicts, lists, NumPy arrays and
    torch tensors but refuses every other global, so a crafted file cannot run code (plain
    ``np.load(allow_pickle=True)`` would). The three functions such files name that could do more
    than that (``_codecs.encode``, ``bytes``, torch's ``_load_from_bytes``) are replaced by safe ones."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "slice"),
        # A pickled tensor: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict()).
        ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"), ("collections", "OrderedDict"),
    }
    _SUBSTITUTES = {
        ("_codecs", "encode"): _latin1_bytes,
        ("builtins", "bytes"): _empty_bytes,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    }

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol 2 names builtins the Python 2 way
            module = "builtins"
        if (module, name) in self._SUBSTITUTES:
            return self._SUBSTITUTES[module, name]
        if (module, name) in self._ALLOWED or (module == "numpy" and name.endswith("DType")) or module == "numpy.dtypes":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only NumPy arrays, torch tensors and plain containers are allowed")


def load_torch_file(path: str | Path, what: str = "file"):
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers only, so a crafted
    pickle cannot run code); WeightsError naming the file when missing, unsafe or unreadable."""
    import torch

    from wsss.errors import WeightsError

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's own text is a page of advice; keep the offending name
        raise WeightsError(f"{path}: refusing to load {what}: it holds pickled objects other than tensors and plain "
                           f"containers{_refused_global(exc)}, which could run code when loaded") from None
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load {what} safely ({type(exc).__name__}: {exc})") from None


def load_pickled_npy(path: str | Path):
    """Load an ``.npy`` that holds a pickled object (IRN's dicts) without executing foreign code.

    Returns the stored object (a 0-d object array is unwrapped); plain numeric arrays load normally.
    Pickles of any protocol load, including protocol 2 (IRN's ``cls_labels.npy``), and torch tensors
    in them (IRN's CAM files) come back as CPU tensors.
    Raises DataError naming the file on any problem.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, _, dtype = read_header(handle)
            if dtype.hasobject:
                value = _RestrictedUnpickler(handle).load()
                if isinstance(value, np.ndarray) and value.shape == () and value.dtype == object:
                    value = value.item()
                return value
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from None
