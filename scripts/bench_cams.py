"""Benchmark LayerCAM map extraction: wsss.cams vs pytorch-grad-cam vs torchcam vs a lower bound.

Workloads (--workloads, several in one run; random weights, random images, each with 1-3 random
classes; LayerCAM maps at three layers for every class of every image):
  vgg16          our CAMClassifier (VGG16) at --height x --width (default 375x500), stages 3-5
  resnet50-224   torchvision's ResNet-50 (20 outputs) at 224x224, blocks layer2, layer3, layer4
  resnet50-voc   the same at VOC size, 375x500
  all            the three

Timing: all contenders run in one process, interleaved batch by batch (each with its own copy of
the model), so load from other processes on a shared machine hits them alike; with --repeats the
fastest pass per method is reported.

Contenders:
  ours      wsss.cams.compute_cams on batches of --batch-size images: images grouped by class
            count, one forward per group, then one backward per class slot of the group,
            gradients w.r.t. the hooked activations only.
  ours3     wsss.cams.compute_cam_sets: what the CAM stage of `wsss run` computes, LayerCAM at
            the three layers plus Grad-CAM and Grad-CAM++ at the deepest, from the same passes.
  gradcam   pytorch_grad_cam.LayerCAM with all three target layers in one instance, used as its
            documented API: per batch and class slot k, one call on the images that have a k-th
            class, with one ClassifierOutputTarget each. Each call runs a forward and a full
            backward (parameter gradients included), computes the three per-layer maps in numpy,
            and also resizes/min-max scales them to the image size and averages them (its output
            merges layers; the per-layer maps are only internal). Same number of maps as ours.
  torchcam  torchcam.methods.LayerCAM with all three layers: one forward per batch, then per
            class slot one extractor call (retain_graph) with a class per image (images without a
            k-th class get a dummy class whose map is discarded); normalized=False.
  bound     the batched bound: the batch's images grouped by class count, per group one forward
            with the model up to the shallowest layer (stage3, layer2) under no_grad and grad
            enabled from its output on, then per class slot one autograd.grad of the group's class
            scores w.r.t. that output (parameters frozen). No maps are computed: the forward and
            backward passes any batched method needs, and nothing else.
  limit     the same one image at a time (per image: one forward, one autograd.grad per class).
            Batched execution beats it, so ours/limit < 1 says little; ours/bound is the figure.

Peak memory: one fresh subprocess per method runs the first batch; CPU: growth of the peak resident
set (VmHWM, reset after building the model and the images); GPU: torch.cuda.max_memory_allocated over the
allocation at that point.

Example: python scripts/bench_cams.py --images 8 --batch-size 4
         python scripts/bench_cams.py --workloads resnet50-224 resnet50-voc --methods ours gradcam torchcam
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
import warnings

import torch

METHODS = ("ours", "ours3", "gradcam", "torchcam", "bound", "limit")
STAGES = ("stage3", "stage4", "stage5")
RESNET_BLOCKS = ("layer2", "layer3", "layer4")
WORKLOADS = ("vgg16", "resnet50-224", "resnet50-voc")
RESNET_SIZES = {"resnet50-224": (224, 224), "resnet50-voc": (375, 500)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=8, help="images timed per method")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workloads", nargs="+", default=["vgg16"], choices=[*WORKLOADS, "all"],
                        help="models and image sizes, run one after the other (default: vgg16)")
    parser.add_argument("--height", type=int, default=375, help="image height of the vgg16 workload")
    parser.add_argument("--width", type=int, default=500, help="image width of the vgg16 workload")
    parser.add_argument("--width-mult", type=float, default=1.0, help="VGG channel multiplier (1.0 = VGG16)")
    parser.add_argument("--classes", default=None, help="classes per image, comma-separated and cycled (e.g. 2,1,3,2); "
                        "default: 1-3 at random")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches (per image for 'limit') before timing")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the images; the fastest is reported "
                        "(other processes on a shared machine add noise)")
    parser.add_argument("--group-by-classes", action="store_true",
                        help="order images by their number of classes before batching (as a CAM stage can), "
                             "so batched methods waste no backward work on images with fewer classes")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--channels-last", action="store_true", help="every contender on a channels-last (NHWC) model and images")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "all" in args.workloads:
        args.workloads = list(WORKLOADS)
    return args


def layers_of(workload: str) -> tuple[str, ...]:
    """Module names of the three hooked layers, shallowest first."""
    if workload == "vgg16":
        from wsss.models.vgg import stage_indices

        return tuple(f"features.{stage_indices(False)[s]}" for s in STAGES)
    return RESNET_BLOCKS


def image_size(args: argparse.Namespace, workload: str) -> tuple[int, int]:
    return RESNET_SIZES.get(workload, (args.height, args.width))


def make_workload(args: argparse.Namespace, workload: str) -> tuple[torch.nn.Module, torch.Tensor, list[list[int]]]:
    torch.manual_seed(args.seed)
    if workload == "vgg16":
        from wsss.models.classifier import CAMClassifier

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the loud "random weights" warning; random is the point here
            model = CAMClassifier(weights="none", width=args.width_mult)
    else:
        import torchvision

        model = torchvision.models.resnet50(weights=None, num_classes=20)
    model = model.to(args.device).eval()
    images = torch.randn(args.images, 3, *image_size(args, workload), device=args.device)
    if args.channels_last:
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    rng = random.Random(args.seed)
    counts = [int(c) for c in args.classes.split(",")] if args.classes else None
    classes = [rng.sample(range(20), counts[n % len(counts)] if counts else rng.randint(1, 3)) for n in range(args.images)]
    if args.group_by_classes:
        order = sorted(range(args.images), key=lambda n: len(classes[n]))
        images, classes = images[order], [classes[n] for n in order]
    return model, images, classes


def batches(images: torch.Tensor, classes: list[list[int]], size: int):
    for start in range(0, len(classes), size):
        yield images[start:start + size], classes[start:start + size]


def make_ours(layers):
    from wsss.cams import compute_cams

    return lambda model, images, classes: compute_cams(model, images, classes, layers, method="layercam")


def make_ours3(layers):
    from wsss.cams import compute_cam_sets

    requests = {"layercam": layers, "gradcam": [layers[-1]], "gradcam++": [layers[-1]]}
    return lambda model, images, classes: compute_cam_sets(model, images, classes, requests)


def make_gradcam(model, layers):
    from pytorch_grad_cam import LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    extractor = LayerCAM(model=model, target_layers=[model.get_submodule(layer) for layer in layers])

    def run(model, images, classes):
        outputs = []
        for k in range(max(len(c) for c in classes)):
            rows = [n for n, c in enumerate(classes) if len(c) > k]
            targets = [ClassifierOutputTarget(classes[n][k]) for n in rows]
            outputs.append(extractor(input_tensor=images[rows], targets=targets))
        return outputs

    return run


def make_torchcam(model, layers):
    from torchcam.methods import LayerCAM

    extractor = LayerCAM(model, target_layer=list(layers))

    def run(model, images, classes):
        scores = model(images)
        slots = max(len(c) for c in classes)
        outputs = []
        for k in range(slots):
            class_idx = [c[k] if len(c) > k else c[0] for c in classes]
            outputs.append(extractor(class_idx=class_idx, scores=scores, normalized=False, retain_graph=k < slots - 1))
        return outputs

    return run


def split_at_shallowest(model: torch.nn.Module, workload: str):
    """(before, after): the model up to and including its shallowest hooked layer, and the rest to the logits."""
    if workload == "vgg16":
        split = int(model.layer_aliases["stage3"].split(".")[1]) + 1
        before, trunk = model.features[:split], model.features[split:]
        return before, lambda x: model.classifier(model.head(trunk(x)).mean(dim=(2, 3)))
    before = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2)
    return before, lambda x: model.fc(torch.flatten(model.avgpool(model.layer4(model.layer3(x))), 1))


def make_limit(model, workload):
    """Per image: one forward, one activation-only backward per class. Returns {(image, class): gradient}."""
    before, after = split_at_shallowest(model, workload)

    def run(model, images, classes):
        gradients = {}
        for n, (image, ids) in enumerate(zip(images, classes)):
            with torch.no_grad():
                shallowest = before(image[None])
            shallowest.requires_grad_()
            logits = after(shallowest)
            for i, c in enumerate(ids):
                (gradients[n, c],) = torch.autograd.grad(logits[0, c], shallowest, retain_graph=i < len(ids) - 1)
        return gradients

    return run


def make_bound(model, workload):
    """Batched: per group of images with the same class count one forward, then one activation-only
    backward per class slot (images are independent, so the gradient of the slot's summed scores is
    each image's own). Returns {(image, class): gradient}, the same as the per-image limit's."""
    before, after = split_at_shallowest(model, workload)

    def run(model, images, classes):
        gradients = {}
        for count in sorted({len(c) for c in classes}):
            rows = [n for n, c in enumerate(classes) if len(c) == count]
            with torch.no_grad():
                shallowest = before(images[rows])
            shallowest.requires_grad_()
            logits = after(shallowest)
            for k in range(count):
                picked = logits[torch.arange(len(rows)), [classes[n][k] for n in rows]].sum()
                (grad,) = torch.autograd.grad(picked, shallowest, retain_graph=k < count - 1)
                gradients.update({(n, classes[n][k]): grad[i:i + 1] for i, n in enumerate(rows)})
        return gradients

    return run


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_runner(method: str, model: torch.nn.Module, workload: str):
    """The function running ``method`` on one batch (the limit goes through its images one by one)."""
    layers = layers_of(workload)
    if method == "gradcam":
        return make_gradcam(model, layers)
    if method == "torchcam":
        return make_torchcam(model, layers)
    if method in ("bound", "limit"):
        model.requires_grad_(False)
        return (make_bound if method == "bound" else make_limit)(model, workload)
    return make_ours3(layers) if method == "ours3" else make_ours(layers)


def peak_rss() -> int:
    """Bytes: the process's peak resident set (VmHWM), or ru_maxrss where /proc has no status."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> int:
    """Reset the peak to the current resident set and return it. A worker started by a large parent
    inherits the parent's peak in ru_maxrss (later workloads then read +0 MiB); Linux resets VmHWM
    on writing 5 to /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass
    return peak_rss()


def memory_worker(args: argparse.Namespace) -> dict:
    """Peak memory of one method on the first batch, in a fresh process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    (workload,) = args.workloads  # one per worker
    model, images, classes = make_workload(args, workload)
    runner = make_runner(args.worker, model, workload)
    batch, ids = next(batches(images, classes, args.batch_size))
    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    runner(model, batch, ids)
    sync(args.device)
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    return {"method": args.worker, "peak_mib": peak / 2**20}


def time_methods(args: argparse.Namespace, methods: list[str], workload: str) -> dict[str, float]:
    """Seconds per pass over all images, per method, the methods interleaved batch by batch.

    Interleaving spreads the load of other processes over all methods alike; each method has its
    own copy of the model so that one library's hooks never run during another's timing.
    """
    model, images, classes = make_workload(args, workload)
    runners = {}
    for method in methods:
        try:
            copy_of_model = copy.deepcopy(model)
            runners[method] = (copy_of_model, make_runner(method, copy_of_model, workload))
        except ImportError as exc:
            print(f"{method:9s} skipped: {type(exc).__name__}: {exc}")
    work = list(batches(images, classes, args.batch_size))
    for batch, ids in work[: args.warmup]:
        for copy_of_model, runner in runners.values():
            runner(copy_of_model, batch, ids)
    best = {method: math.inf for method in runners}
    for _ in range(args.repeats):
        totals = dict.fromkeys(runners, 0.0)
        for index, (batch, ids) in enumerate(work):
            order = list(runners)
            order = order[index % len(order):] + order[: index % len(order)]  # no method always runs first
            for method in order:
                copy_of_model, runner = runners[method]
                sync(args.device)
                start = time.perf_counter()
                runner(copy_of_model, batch, ids)
                sync(args.device)
                totals[method] += time.perf_counter() - start
        best = {method: min(best[method], totals[method]) for method in runners}
    return best


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.worker:
        try:
            print(json.dumps(memory_worker(args)))
        except ImportError as exc:
            print(json.dumps({"method": args.worker, "skipped": f"{type(exc).__name__}: {exc}"}))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    for workload in args.workloads:
        run_workload(args, argv, workload)


def run_workload(args: argparse.Namespace, argv: list[str], workload: str) -> None:
    """Peak memory (one subprocess per method) and interleaved timing of every method on one workload."""
    _, _, classes = make_workload(args, workload)
    counts = [len(c) for c in classes]
    height, width = image_size(args, workload)
    layers = layers_of(workload)
    width_mult = f" width_mult={args.width_mult}" if workload == "vgg16" else ""
    print(f"== {workload}: device={args.device} images={args.images} size={height}x{width}{width_mult} "
          f"batch={args.batch_size} warmup={args.warmup} repeats={args.repeats} threads={torch.get_num_threads()} "
          f"group_by_classes={args.group_by_classes} channels_last={args.channels_last}")
    print(f"classes per image, in batch order: {counts} (maps per layer: {sum(counts)}); layers: {', '.join(layers)}")

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    memory: dict[str, float] = {}
    for method in args.methods:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--workloads", workload, "--worker", method],
                              capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines and "peak_mib" in json.loads(lines[-1]):
            memory[method] = json.loads(lines[-1])["peak_mib"]
        else:
            print(f"{method:9s} memory run failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")

    seconds = time_methods(args, args.methods, workload)
    for method, total in seconds.items():
        peak = f"{memory[method]:8.1f} MiB" if method in memory else "     n/a"
        print(f"{method:9s} {len(classes) / total:8.3f} images/s  {total:8.2f} s  peak +{peak} (first batch)")
    if "ours" in seconds:
        ours = seconds["ours"]
        for other, label in (("gradcam", "ours vs pytorch-grad-cam: throughput x"), ("torchcam", "ours vs torchcam: throughput x")):
            if other in seconds:
                print(f"{label}{seconds[other] / ours:.2f}")
        if "bound" in seconds:
            print(f"ours time / batched bound time: {ours / seconds['bound']:.3f}")
        if "limit" in seconds:
            print(f"ours time / per-image limit time: {ours / seconds['limit']:.3f}")
        if "ours3" in seconds:
            print(f"three methods (LayerCAM at {', '.join(layers)}, Grad-CAM and Grad-CAM++ at {layers[-1]}) / LayerCAM alone: "
                  f"time x{seconds['ours3'] / ours:.3f}")

if __name__ == "__main__":
    main()
