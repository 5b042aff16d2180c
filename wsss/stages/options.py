"""Argument helpers the stage CLIs share beyond their typed options (:mod:`wsss.options`): id lists
and the evaluation commands' common arguments. Not a stage: stages import it, it imports no stage."""
from __future__ import annotations

import argparse
import os
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
        raise DataError(f"no {what} files in {folder}; pass --list")
    return ids
