"""``wsss`` console script: one subcommand per stage, each implemented in its own module."""
from __future__ import annotations

import importlib
import logging
import sys

from wsss import limit_onednn_cache
from wsss.errors import WsssError
from wsss.parallel import end_process_group

# subcommand -> ("module:function", one-line help). Each function takes argv and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-toy-voc": ("wsss.data.toy_cli:main", "write the built-in toy dataset in the VOC layout"),
    "check-data": ("wsss.data.check:main", "validate every image, mask and list of a VOC-layout dataset"),
    "train-cls": ("wsss.stages.train_classifier:main", "stage 1: train the multi-label VGG16 classifier"),
    "cams": ("wsss.stages.cams:main", "stage 2: LayerCAM / Grad-CAM / Grad-CAM++ maps per image, fused across layers"),
    "train-seg": ("wsss.stages.train_segmenter:main", "stage 4: train DeepLab-LargeFOV on pseudo-labels (or GT)"),
    "predict-seg": ("wsss.stages.predict:main", "stage 4: write segmenter label PNGs for a split"),
    "refine": ("wsss.stages.refine:main", "CAMs -> affinity + random walk refined CAMs and labels (PSA/IRN), from any CAM folder"),
    "pseudo-labels": ("wsss.stages.pseudo_labels:main", "stage 3: CAM files -> superpixel pseudo-label PNGs"),
    "evaluate": ("wsss.stages.evaluate:main", "mIoU of any folder of label PNGs against GT masks"),
    "eval-cams": ("wsss.stages.eval_cams:main", "mIoU of thresholded CAM seeds over a background-threshold sweep"),
    "run": ("wsss.pipeline.run:main", "every stage in order from one YAML; up-to-date stages are skipped"),
    "demo": ("wsss.pipeline.run:demo_main", "the whole pipeline on the built-in toy dataset, a few minutes on a CPU"),
    "report": ("wsss.report:main", "contact sheets of every stage's maps per image + index.html with the results table"),
    "show": ("wsss.report:show_main", "one image's row of maps (image, GT, CAMs, pseudo-label, prediction) as a PNG"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: wsss COMMAND [options]   (wsss COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from wsss import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"wsss: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    limit_onednn_cache()  # before any stage module (and torch's first convolution) runs
    module_name, function_name = SUBCOMMANDS[command][0].split(":")
    entry = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(entry(rest) or 0)
    except WsssError as exc:
        print(f"wsss {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wsss {command}: interrupted; finished outputs are kept, rerun to resume", file=sys.stderr)
        return 130
    finally:
        end_process_group()


if __name__ == "__main__":
    sys.exit(main())
