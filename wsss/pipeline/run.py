"""``wsss run`` and ``wsss demo``: the steps in order, in one process, from one YAML.

A step whose manifest says it is up to date is skipped; an interrupted one resumes; one whose
options changed (or named by ``--from``/``--force``) starts afresh (:mod:`wsss.pipeline.manifest`).

DDP inside a run: a step whose stage runs on several devices (``cams.devices: 2``, or
``trainer.devices`` in a training section) is started by Lightning's ``ddp`` launcher, which
re-runs this process's command line in the other processes. Those find the step's name in
``WSSS_RUN_STEP`` (set for the step's duration and inherited), run that step's stage alone,
silently, and exit: no manifests, no other step. Afterwards this process ends the process group,
so that a later DDP step starts processes of its own.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from wsss.errors import ConfigError, WsssError
from wsss.parallel import end_process_group
from wsss.pipeline import steps
from wsss.pipeline.config import PipelineConfig, load_config
from wsss.pipeline.manifest import Decision, decide, digest, read_manifest, write_manifest
from wsss.pipeline.results import build_results, results_table
from wsss.pipeline.steps import STAGES, STEP_BY_NAME, STEPS, Run, hashed_payload

STEP_ENV = "WSSS_RUN_STEP"
# What Lightning's ddp launcher puts in the environment of the process that starts the others.
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class StageError(WsssError):
    """A stage failed with a user-facing error; the message names the stage."""

    def __init__(self, stage: str, cause: Exception):
        super().__init__(f"stage '{stage}' failed: {cause} (earlier stages' outputs are kept; fix and rerun to resume)")
        self.stage = stage


def ddp_child_step() -> str | None:
    """The step this process must run alone: set when Lightning's ddp launcher started it (as local
    rank > 0) by re-running ``wsss run`` during that step; None in the process the user started."""
    step = os.environ.get(STEP_ENV)
    return step if step and os.environ.get("LOCAL_RANK", "0") != "0" else None


@contextlib.contextmanager
def step_scope(name: str) -> Iterator[None]:
    """Run step ``name`` with its name in the environment of any process Lightning starts, and leave
    no process group or launcher variables behind it."""
    saved = {key: os.environ.get(key) for key in (STEP_ENV, *_LAUNCHER_ENV)}
    os.environ[STEP_ENV] = name
    try:
        yield
    finally:
        end_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _clear(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _run_step(step: steps.Step, run: Run) -> dict[str, Any]:
    with step_scope(step.name):
        try:
            return step.run(run)
        except WsssError as exc:
            raise StageError(step.name, exc) from exc
        except BaseException:
            print(f"wsss run: stage '{step.name}' failed (earlier stages' outputs are kept; rerun to resume)", file=sys.stderr, flush=True)
            raise


def run_pipeline(config: PipelineConfig, start_from: str | None = None, force: bool = False, until: str | None = None) -> dict[str, Any]:
    """Run every step that is not up to date, stopping after ``until`` if given.

    Returns the results table (the contents of ``OUT/results.json`` when the run got that far).
    """
    from wsss.data import resolve_data_root
    from wsss.io import ensure_output_dir

    for option, stage in (("--from", start_from), ("--until", until)):
        if stage is not None and stage not in STAGES:
            raise ConfigError(f"{option} {stage!r}: choose from {', '.join(STAGES)}")
    last = STAGES.index(until) if until else len(STAGES) - 1
    out = ensure_output_dir(config.out)
    run = Run(config, out, resolve_data_root(config.data_root).resolve())
    steps.check_training_configs(run)
    steps.check_extras(run)
    steps.check_splits(run)
    forced = set(STAGES) if force else set(STAGES[STAGES.index(start_from):]) if start_from else set()
    total = time.perf_counter()
    hashes: dict[str, str] = {}
    print(f"wsss run: data {run.data_root}, output {out.resolve()}", flush=True)
    for number, step in enumerate(STEPS[:last + 1], 1):
        payload = hashed_payload(step, run, hashes)
        hashes[step.name] = digest(payload)
        banner = f"[{number}/{len(STEPS)}] {step.name}"
        if not step.enabled(run):
            print(f"{banner}: off", flush=True)
            continue
        decision = decide(read_manifest(out, step.name), hashes[step.name], step.name in forced, lambda: step.complete(run))
        print(f"{banner}: {decision.value}", flush=True)
        if decision is Decision.SKIP:
            continue
        if decision is Decision.FRESH:
            _clear(step.outputs(run))
        record = {"stage": step.name, "hash": hashes[step.name], "deps": {d: hashes[d] for d in step.deps},
                  "config": config.to_dict()[step.section] if step.section else None, "hashed": payload, "finished": False}
        write_manifest(out, step.name, record)
        start = time.perf_counter()
        produced = _run_step(step, run)
        seconds = time.perf_counter() - start
        write_manifest(out, step.name, {**record, **produced, "seconds": round(seconds, 2), "finished": True,
                                         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"{banner}: done in {seconds:.1f}s", flush=True)
    if STAGES[last] == "evaluate":
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        print(f"wsss run: finished in {time.perf_counter() - total:.1f}s; results in {out / 'results.json'}\n")
    else:
        results = build_results(config, run.data_root, lambda name: read_manifest(out, name), {})
        print(f"wsss run: stopped after '{STAGES[last]}' in {time.perf_counter() - total:.1f}s\n")
    print(results_table(results), flush=True)
    return results


def explain(config: PipelineConfig, start_from: str | None = None, force: bool = False, until: str | None = None) -> list[str]:
    """Per step, whether ``run_pipeline`` with the same arguments would run it or reuse its outputs,
    and why (what changed since its manifest was written); runs nothing."""
    from wsss.data import resolve_data_root

    last = STAGES.index(until) if until else len(STAGES) - 1
    out = Path(config.out)
    run = Run(config, out, resolve_data_root(config.data_root).resolve(), quiet=True)
    forced = set(STAGES) if force else set(STAGES[STAGES.index(start_from):]) if start_from else set()
    hashes: dict[str, str] = {}
    will_run: set[str] = set()
    lines = []
    for number, step in enumerate(STEPS[:last + 1], 1):
        payload = hashed_payload(step, run, hashes)
        hashes[step.name] = digest(payload)
        if not step.enabled(run):
            lines.append(f"[{number}/{len(STEPS)}] {step.name}: off")
            continue
        manifest = read_manifest(out, step.name)
        decision = decide(manifest, hashes[step.name], step.name in forced, lambda: step.complete(run))
        if decision is Decision.SKIP:
            reason = "outputs up to date"
        elif step.name in forced:
            reason = "named by --from/--force"
        elif manifest is None:
            reason = "never run into this folder"
        elif decision is Decision.RESUME:
            reason = "same settings; interrupted or outputs missing, finished files are kept"
        else:
            rerun_deps = [d for d in step.deps if d in will_run]
            changed = [c for c in changed_settings(manifest.get("hashed"), payload) if not c.startswith("deps.")]
            parts = ([f"reads '{', '.join(rerun_deps)}', which will run"] if rerun_deps else []) + changed
            reason = "; ".join(parts[:8]) or "its manifest predates the recorded settings"
        if decision is not Decision.SKIP:
            will_run.add(step.name)
        lines.append(f"[{number}/{len(STEPS)}] {step.name}: {'reuse' if decision is Decision.SKIP else 'run'} ({reason})")
    return lines


def changed_settings(before: Any, after: Any, prefix: str = "") -> list[str]:
    """``["cams.fusion: 'max' -> 'mean'", ...]``: the leaves that differ between two hashed payloads."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for key in sorted(set(before) | set(after), key=str)
                for change in changed_settings(before.get(key), after.get(key), f"{prefix}{key}.")]
    if before != after:
        return [f"{prefix[:-1] or 'settings'}: {before!r} -> {after!r}"]
    return []


def run_step_alone(config: PipelineConfig, name: str) -> None:
    """Step ``name``'s stage call and nothing else, silently: what a DDP process started during that
    step does (see the module docstring)."""
    from wsss.data import resolve_data_root

    print(f"wsss run: process {os.environ.get('LOCAL_RANK')} of a DDP step runs step '{name}' alone", file=sys.stderr, flush=True)
    STEP_BY_NAME[name].run(Run(config, Path(config.out), resolve_data_root(config.data_root).resolve(), quiet=True))


def quiet_library_logs() -> None:
    """Keep a whole-pipeline run readable: Lightning's per-Trainer banners (devices, tips, model
    summaries) and the stages' per-validation tables repeat for every stage; the run prints its
    own progress and one results table. Warnings and errors still show."""
    import pytorch_lightning  # noqa: F401  (its import sets its logger to INFO: import first, then quiet it)

    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "wsss.stages", "wsss.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")  # Lightning's own, once per Trainer


def dotted_overrides(parser: argparse.ArgumentParser, tokens: list[str]) -> dict[str, Any]:
    """``["--cams.fusion", "mean", "--segmenter.trainer.max_steps=100", "--cam-split", "train"]`` ->
    ``{"cams.fusion": "mean", "segmenter.trainer.max_steps": 100, "cam_split": "train"}``: each value read
    as YAML (the configuration then refuses unknown keys); anything else is an argparse error."""
    overrides: dict[str, Any] = {}
    tokens = list(tokens)
    while tokens:
        token = tokens.pop(0)
        key, has_value, text = token[2:].partition("=")
        if not token.startswith("--") or not key:
            parser.error(f"unrecognized argument {token!r} (pipeline keys are overridden as --key VALUE or --section.key VALUE)")
        if not has_value:
            if not tokens or tokens[0].startswith("--"):
                parser.error(f"{token} needs a value")
            text = tokens.pop(0)
        try:
            overrides[key.replace("-", "_")] = yaml.safe_load(text)
        except yaml.YAMLError:
            overrides[key.replace("-", "_")] = text
    return overrides


def main(argv: list[str]) -> int:
    """``wsss run``: see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="wsss run",
        description=f"Run every stage ({', '.join(STAGES)}) from one YAML; stages whose outputs are up to date are skipped.",
    )
    parser.add_argument("-c", "--config", required=True, help="pipeline YAML (e.g. configs/pipeline.yaml)")
    parser.add_argument("--data-root", default=None, help="overrides data_root of the config ('toy' = built-in toy dataset)")
    parser.add_argument("--out", default=None, help="overrides out of the config (output folder)")
    parser.add_argument("--from", dest="start_from", default=None, choices=STAGES, help="re-run this stage and every later one")
    parser.add_argument("--until", default=None, choices=STAGES, help="stop after this stage")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration (every default filled in) and exit")
    parser.add_argument("--explain", action="store_true", help="print, per step, whether it would run or be reused and why; run nothing")
    parser.epilog = ("Any key of the pipeline YAML can be overridden with a dotted flag: --cams.fusion mean, "
                     "--pseudo.threshold 0.25, --segmenter.trainer.max_steps 100 (values read as YAML: 0.25, [a, b], null).")
    args, rest = parser.parse_known_args(argv)
    config = load_config(args.config, {"data_root": args.data_root, "out": args.out}, dotted_overrides(parser, rest))
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    if args.explain:
        quiet_library_logs()
        print("\n".join(explain(config, args.start_from, args.force, args.until)))
        return 0
    quiet_library_logs()
    child_step = ddp_child_step()
    if child_step is not None:
        run_step_alone(config, child_step)
        return 0
    run_pipeline(config, args.start_from, args.force, args.until)
    return 0


def default_toy_config() -> Path:
    path = Path(__file__).resolve().parents[2] / "configs" / "toy" / "pipeline.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: `wsss demo` needs the repository's configs/ folder (install with pip install -e .)")
    return path


def demo_main(argv: list[str]) -> int:
    """``wsss demo``: the whole pipeline on the built-in toy dataset in a few minutes on a CPU."""
    from wsss.data import resolve_data_root
    from wsss.report import write_report

    parser = argparse.ArgumentParser(prog="wsss demo", description="Generate the toy dataset and run the whole pipeline on it "
                                     "(configs/toy/pipeline.yaml): a few minutes on 2 CPU cores, no data, no internet.")
    parser.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = resolve_data_root("toy")
    print(f"wsss demo: toy dataset at {root}", flush=True)
    config = load_config(default_toy_config(), {"data_root": str(root), "out": args.out})
    quiet_library_logs()
    run_pipeline(config, force=args.force)
    print(f"report: {write_report(args.out, root)}")
    print(f"wsss demo: done in {time.perf_counter() - start:.0f}s")
    return 0
