"""Peak memory of the CAM and pseudo-label stages per batch size, and whether it grows with the
number of images.

Each measurement runs the stage function (``make_cams`` with the three variants ``wsss run``
writes, or ``make_pseudo_labels``) in a fresh subprocess on the first N ids of a split, and
reports the growth of the process's peak resident memory (ru_maxrss; on a GPU also
``torch.cuda.max_memory_allocated``) over its state just before the call. The same batch size on
N and on 3N images must give the same peak: a stage whose memory grows with the number of images
would show it here.

Example (real photos, a trained classifier):
  python scripts/bench_memory.py --data-root ../shared/data/voc12_mini --checkpoint out/voc_mini/classifier/best.ckpt
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--checkpoint", required=True, help="a train-cls checkpoint")
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", type=int, default=16, help="N: runs use N and 3N images")
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--worker", nargs=4, metavar=("STAGE", "BATCH", "N", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> dict:
    import torch

    from wsss.data import open_layout
    from wsss.stages.cams import CamOptions, make_cams
    from wsss.stages.pseudo_labels import make_pseudo_labels
    from wsss.systems.predictors import CamVariant

    stage, batch, count, out = args.worker[0], int(args.worker[1]), int(args.worker[2]), Path(args.worker[3])
    ids = open_layout(args.data_root).read_ids(args.split)[:count]
    split = out / "ids.txt"
    split.write_text("\n".join(ids) + "\n")
    cams = out / "cams"
    variants = {cams / "layercam": CamVariant("layercam", ("stage3", "stage4", "stage5"), ("stage3",), True),
                cams / "gradcam": CamVariant("gradcam", ("stage5",), (), False),
                cams / "gradcampp": CamVariant("gradcam++", ("stage5",), (), False)}
    import gc

    gc.collect()
    base = peak_bytes()
    on_gpu = torch.cuda.is_available() and args.accelerator != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    if stage == "cams":
        make_cams(args.checkpoint, args.data_root, variants, CamOptions(batch_size=batch, num_workers=0, accelerator=args.accelerator),
                  split=str(split), progress=False, overwrite=True)
    else:  # reads the CAM files a "cams" worker left in OUT (a process of its own: ru_maxrss only rises)
        make_pseudo_labels(args.data_root, cams / "layercam", out / "pseudo", split=str(split), progress=False)
    result = {"stage": stage, "batch": batch, "images": count, "peak_mib": (peak_bytes() - base) / 2**20}
    if on_gpu:
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    runs = [("cams", b) for b in args.batch_sizes.split(",")] + [("pseudo", "1")]
    print(f"data {args.data_root} ({args.split}), checkpoint {args.checkpoint}; peak = growth of max RSS during the stage call")
    for stage, batch in runs:
        row = []
        for count in (args.images, 3 * args.images):
            with tempfile.TemporaryDirectory() as tmp:
                for job in (["cams", "1"], [stage, batch]) if stage == "pseudo" else ([stage, batch],):
                    done = subprocess.run([sys.executable, __file__, "--data-root", args.data_root, "--checkpoint", args.checkpoint,
                                           "--split", args.split, "--accelerator", args.accelerator, "--worker", *job, str(count), tmp],
                                          capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                print(f"{stage} batch {batch}: failed: {done.stderr.strip().splitlines()[-1:]}")
                break
            row.append(json.loads(lines[-1]))
        if len(row) == 2:
            gpu = "".join(f"  GPU {r['gpu_peak_mib']:.0f} MiB" for r in row if "gpu_peak_mib" in r)
            print(f"{stage:6s} batch {batch}: {row[0]['images']:4d} images +{row[0]['peak_mib']:7.1f} MiB   "
                  f"{row[1]['images']:4d} images +{row[1]['peak_mib']:7.1f} MiB   growth x{row[1]['peak_mib'] / max(row[0]['peak_mib'], 1e-9):.2f}{gpu}", flush=True)


if __name__ == "__main__":
    main()
