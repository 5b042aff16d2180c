"""Write the README's table of stage options from the stages' option dataclasses (one source:
the dataclass that the stage's CLI and ``wsss run`` both build). ``--check`` exits 1 when the
README's table differs from what the dataclasses give.

    python scripts/stage_reference.py          # rewrite the block in README.md
    python scripts/stage_reference.py --check  # what the test suite runs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- stage-options:begin (scripts/stage_reference.py) -->", "<!-- stage-options:end -->"


def generated() -> str:
    from wsss.options import reference_rows
    from wsss.stages.cams import CamOptions
    from wsss.stages.eval_cams import EvalCamsOptions
    from wsss.stages.predict import PredictOptions
    from wsss.stages.pseudo_labels import PseudoLabelOptions
    from wsss.stages.refine import RefineOptions
    from wsss.systems.predictors import CamVariant

    sections = [
        ("`wsss cams` (pipeline `cams:`; `--method`, `--save-layers` are the command's alone, the run makes LayerCAM + `baselines`)",
         [CamVariant, CamOptions]),
        ("`wsss eval-cams` (pipeline `eval_cams:`)", [EvalCamsOptions]),
        ("`wsss refine` (pipeline `refine:`, with `enabled`, `variants`, `thresholds_from_seeds`, `bg_factor`, `fg_factor`)", [RefineOptions]),
        ("`wsss pseudo-labels` (pipeline `pseudo:`, with `threshold_from_seeds`)", [PseudoLabelOptions]),
        ("`wsss predict-seg` (pipeline `predict:`, with `splits`)", [PredictOptions]),
    ]
    lines = [BEGIN]
    for title, classes in sections:
        lines += ["", f"{title}:", "", "| option / YAML key | default | what it does |", "| --- | --- | --- |"]
        for cls in classes:
            lines += reference_rows(cls)
    return "\n".join([*lines, "", END])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print(f"{README}: no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + generated() + tail
    if args.check:
        if new != text:
            print("README.md's stage options differ from the option dataclasses: run python scripts/stage_reference.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
