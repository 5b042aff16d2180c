"""Argument helpers the stage CLIs share beyond their typed options (:mod:`wsss.options`): id lists
and the evaluation commands' common arguments. Not a stage: stages import it, it imports no stage."""
from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from wsss.data.voc import read_id_list
from wsss.errors import ConfigError, DataError
from wsss.io import ensure_output_file


def check_at_least(option: str, value: float | None, minimum: float, strict: bool = False) -> None:
    """ConfigError unless ``value`` (when given) is >= ``minimum`` (> with ``strict``)."""
    if value is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{option} must be {'>' if strict else '>='} {minimum:g}, got {value}")


def add_evaluation_arguments(parser: argparse.ArgumentParser, list_help: str, json_help: str, workers_help: str) -> None:
    """``--list``, ``--json`` and ``--workers``, as ``wsss evaluate`` and ``wsss eval-cams`` take them."""
    parser.add_argument("--list", type=Path, default=None, help=list_help)
    parser.add_argument("--json", type=Path, default=None, help=json_help)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help=workers_help)


def check_evaluation_arguments(args: argparse.Namespace) -> None:
    """Refuse bad ``--workers`` and an unwritable ``--json`` before any work."""
    check_at_least("--workers", args.workers, 1)
    if args.json is not None:
        ensure_output_file(args.json, "--json file")


def listed_ids(list_file: Path | None, folder: Path, ids_in: Callable[[Path], list[str]], what: str) -> list[str]:
    """The ids of ``--list``, or by default those of the ``what`` files in ``folder``."""
    ids = read_id_list(list_file) if list_file is not None else ids_in(folder)
    if not ids:
        if list_file is not None:
            raise DataError(f"{list_file} lists no ids")
        raise DataError(f"no {what} files in {folder}: {folder_contents(folder, masks=what == 'png')}")
    return ids


def folder_contents(folder: Path, masks: bool = False) -> str:
    """What ``folder`` holds, for an error about the files it lacks: ``it holds 784 .jpg files``,
    ``it is empty``, ``it does not exist``. ``masks``: the folder should hold label PNGs (a folder
    of photos gets a pointer to the masks folder)."""
    if not folder.is_dir():
        return "it does not exist" if not folder.exists() else "it is a file, not a folder"
    entries = list(folder.iterdir())
    suffixes = Counter(p.suffix.lower() or "(no suffix)" for p in entries if p.is_file())
    folders = sum(1 for p in entries if p.is_dir())
    if not suffixes and not folders:
        return "it is empty"
    found = ", ".join(f"{n} {suffix} files" for suffix, n in suffixes.most_common(3))
    found = ", ".join(filter(None, [found, f"{folders} folders" if folders else ""]))
    hint = " (photos, not masks: point at the masks folder, e.g. VOC2012/SegmentationClass)" if masks and suffixes.get(".jpg") else ""
    return f"it holds {found}{hint}"


LABEL_SET_HELP = ("label set of the masks: voc (21 labels, default), coco (81: background + COCO 2014's 80 things in "
                  "category-id order), or a YAML/JSON file with 'names' (background included), optionally 'background' and 'ignore'")


def add_label_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-set", default="voc", help=LABEL_SET_HELP)
