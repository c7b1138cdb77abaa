"""Every family on one GPU, in one run, ratios side by side: what the GPU issues ask to measure.

    python benchmarks/gpu.py --json $OUT/gpu.json            # a CUDA machine (about 6 minutes on an H200)
    python benchmarks/gpu.py --smoke                         # CPU: tiny sizes, 1 timed step: it runs

Sections, each written to --json as soon as it is done (a run cut short keeps what it measured):

1. training images/s per family of the loop's own step (genflow.train.step.optimisation_step:
            forward, per-optimizer backward, clipping, the optimizers' fused AdamW on CUDA,
            after_step), at the pipeline's params.yaml sizes except where GPU_SIZES says (the
            papers' sizes: DCGAN/cGAN 128 channels, ddpm's reference preset), in
            fp32 (PyTorch's defaults: cuDNN convolutions may use TF32, matmuls do not),
            bf16 (autocast), bf16+channels_last (what the loop runs with train.bf16 on a GPU),
            and +compile (train.compile) for vae and ddpm; peak memory of each.
2. ddpm sampling: DDIM-50 and DDPM-1000 images/s of the reference preset (their ratio), the
            U-Net in bf16 against fp32, and how far apart the same noise's images end up.
3. evaluation: what 10,000-sample evaluation costs per family (evaluate.samples on a GPU):
            sampling images/s per family at --eval-batch (each family samples until --sample-cap
            seconds have passed or N images are drawn; the time for N is then rate x N), plus
            EfficientNet-Lite0 featurising of N images and FD + KID + precision/recall on two
            sets of N features (both the same for every family, measured once on N images).

4. ddp      one optimisation step per family through DistributedDataParallel over NCCL (one rank:
            this machine has one GPU; NCCL refuses two ranks on one device), bf16 autocast and
            channels_last as the loop runs on a GPU: the GPU code path runs, and stays finite.

Untrained weights throughout: speed does not depend on what the weights have learned.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genflow.config import load_params  # noqa: E402
from genflow.models.families import FAMILY_NAMES, get_family  # noqa: E402
from genflow.models.protocol import Batch  # noqa: E402
from genflow.models.vae import IMAGE_SIZE  # noqa: E402
from genflow.train.step import Optimization, ddp_options, optimisation_step  # noqa: E402

# The papers' sizes where params.yaml's (sized for 2 CPU cores) would leave a GPU idle.
GPU_SIZES = {
    "dcgan": ["models.dcgan.generator_channels=128", "models.dcgan.discriminator_channels=128"],
    "cgan": ["models.cgan.generator_channels=128", "models.cgan.discriminator_channels=128"],
    "ddpm": ["models.ddpm.preset=reference"],
}
SMOKE_SIZES = {"ddpm": ["models.ddpm.preset=tiny"]}
BATCH = {"ddpm": 128}  # the reference preset's batch (DDIM paper); the others 256
COMPILED = {"vae", "ddpm"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Report:
    """Sections as they finish, printed and written to the JSON file at once."""

    def __init__(self, path: str | None, header: dict):
        self.path, self.data = path, {**header, "sections": {}}
        self.flush()

    def add(self, section: str, value) -> None:
        self.data["sections"][section] = value
        self.flush()

    def flush(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=2, default=str))


def build(family: str, args, device: torch.device, seed: int = 0):
    sizes = (SMOKE_SIZES if args.smoke else GPU_SIZES).get(family, [])
    params = load_params(args.params, overrides=sizes)
    torch.manual_seed(seed)
    model = get_family(family)(params.family_config(family, for_training=False)).to(device)
    return model, params


def make_batch(n: int, model, device: torch.device, channels_last: bool) -> Batch:
    low, high = model.image_range
    # k/255 pixels, as the loader gives (pixelcnn recovers the integers from them).
    pixels = torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), device=device).float() / 255
    images = pixels * (high - low) + low
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return Batch(images, torch.randint(0, 2, (n, 40), device=device).float())


def train_speed(family: str, args, device: torch.device, bf16: bool, channels_last: bool, compile: bool) -> dict:
    model, params = build(family, args, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_size = args.batch or BATCH.get(family, 256)
    batch = make_batch(batch_size, model, device, channels_last)
    model.initialize(batch)
    optimization = Optimization.build(model, params.train)
    forward = torch.compile(model) if compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    # Steps past any warm-up phase (sae's greedy phases): the timed step trains the whole model.
    first = 10_000

    def step(k: int) -> bool:
        return optimisation_step(forward, model, optimization, batch, first + k, grad_clip=params.train.grad_clip,
                                 autocast=autocast).finite

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        start = time.perf_counter()
        for k in range(args.warmup):  # compilation, cuDNN autotuning, the allocator
            step(k)
        synchronize(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        finite = all([step(args.warmup + k) for k in range(args.steps)])
        synchronize(device)
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return {"fits": False, "batch": batch_size}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"fits": True, "batch": batch_size, "images_per_s": batch_size * args.steps / elapsed,
            "peak_gib": peak, "warmup_s": warmup_s, "finite": finite,
            # trained parameters (an EMA copy is not counted twice)
            "parameters": sum(p.numel() for group in optimization.parameters.values() for p in group)}


def section_training(args, device, report) -> None:
    rows = {}
    for family in args.families:
        variants = [("fp32", False, False, False), ("bf16", True, False, False), ("bf16+channels_last", True, True, False)]
        if family in COMPILED and not args.no_compile:
            variants.append(("bf16+channels_last+compile", True, True, True))
        rows[family] = {}
        for name, bf16, channels_last, compile in variants:
            if time.monotonic() > args.deadline:
                rows[family][name] = {"skipped": "out of time"}
                continue
            try:
                rows[family][name] = train_speed(family, args, device, bf16, channels_last, compile)
            except Exception as err:  # one family's failure must not cost the others' figures
                rows[family][name] = {"error": f"{type(err).__name__}: {err}"[:500]}
                traceback.print_exc()
            print_training_row(family, name, rows[family])
            report.add("training", rows)


def print_training_row(family: str, name: str, rows: dict) -> None:
    row = rows[name]
    if "images_per_s" not in row:
        print(f"  {family:<9} {name:<28} {json.dumps(row)}", flush=True)
        return
    base = rows.get("fp32", {}).get("images_per_s")
    ratio = f"{row['images_per_s'] / base:5.2f}x" if base else "  -  "
    peak = f"{row['peak_gib']:7.2f} GiB" if row["peak_gib"] is not None else ""
    print(f"  {family:<9} {name:<28} batch {row['batch']:>4} {row['images_per_s']:>10.1f} img/s {ratio} vs fp32 "
          f"{peak} warm-up {row['warmup_s']:6.1f} s finite={row['finite']}", flush=True)


def section_ddp(args, device, report) -> None:
    """One rank of NCCL (gloo on CPU): DDP's wrapping, hooks and buffers on the GPU path."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    rows = {}
    try:
        for family in args.families:
            on_gpu = device.type == "cuda"
            try:
                model, params = build(family, args, device)
                if on_gpu:
                    model = model.to(memory_format=torch.channels_last)
                batch = make_batch(8, model, device, on_gpu)
                model.initialize(batch)
                optimization = Optimization.build(model, params.train)
                wrapped = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index or 0] if on_gpu else None, **ddp_options(model))
                autocast = torch.autocast(device.type, dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
                finite = [optimisation_step(wrapped, model, optimization, batch, 10_000 + k, grad_clip=1.0, autocast=autocast).finite
                          for k in range(2)]
                rows[family] = {"backend": backend, "finite": all(finite)}
            except Exception as err:
                rows[family] = {"backend": backend, "error": f"{type(err).__name__}: {err}"[:500]}
                traceback.print_exc()
            print(f"  {family:<9} DDP {backend}{' bf16' if on_gpu else ''}: {rows[family]}", flush=True)
    finally:
        dist.destroy_process_group()
    report.add("ddp", rows)


def section_ddpm_sampling(args, device, report) -> None:
    model, _ = build("ddpm", args, device)
    model.eval()
    with torch.no_grad():  # a non-zero output layer, as after training (else every prediction is 0)
        for net in (model.unet, model.ema):
            torch.nn.init.normal_(net.head[-1].weight, std=0.02)
    n = args.ddpm_sample_n
    rows, images = [], {}

    def timed(sampler: str, steps: int, bf16: bool) -> tuple[float, torch.Tensor]:
        model.config.sample_bf16 = bf16
        model.sample(2, generator=torch.Generator(device).manual_seed(1), sampler="ddim", steps=2)  # warm-up
        synchronize(device)
        choices = {"steps": steps, "eta": 0.0} if sampler == "ddim" else {}
        start = time.perf_counter()
        out = model.sample(n, generator=torch.Generator(device).manual_seed(0), sampler=sampler, **choices)
        synchronize(device)
        return n / (time.perf_counter() - start), out

    runs = [("ddim", 50, False), ("ddim", 50, True), ("ddpm", 1000, True)]
    for sampler, steps, bf16 in runs[:2] if args.smoke else runs:  # DDPM-1000 takes minutes on a CPU
        if time.monotonic() > args.deadline:
            rows.append({"sampler": sampler, "skipped": "out of time"})
            continue
        rate, images[(sampler, bf16)] = timed(sampler, steps, bf16)
        rows.append({"sampler": f"{sampler.upper()}-{steps}", "bf16": bf16 and device.type == "cuda", "n": n, "images_per_s": rate})
        print(f"  ddpm {sampler.upper()}-{steps} {'bf16' if bf16 else 'fp32'}: {rate:.2f} img/s (n={n})", flush=True)
    result = {"rows": rows, "preset": model.config.preset}
    if ("ddim", True) in images and ("ddim", False) in images:
        difference = (images[("ddim", True)].int() - images[("ddim", False)].int()).abs().float()
        result["ddim50_bf16_vs_fp32_mean_abs_pixel"] = difference.mean().item()
        result["ddim50_bf16_vs_fp32_max_abs_pixel"] = difference.max().item()
    rates = {(r.get("sampler"), r.get("bf16")): r.get("images_per_s") for r in rows}
    ddim, ddpm = rates.get(("DDIM-50", device.type == "cuda")), rates.get(("DDPM-1000", device.type == "cuda"))
    if ddim and ddpm:
        result["ddim50_over_ddpm1000"] = ddim / ddpm
    print(f"  ddpm sampling: {json.dumps({k: v for k, v in result.items() if k != 'rows'})}", flush=True)
    report.add("ddpm_sampling", result)


def section_evaluation(args, device, report) -> None:
    from genflow.eval.distances import SavedStats
    from genflow.eval.features import StreamTimes, load_extractor, stream_features
    from genflow.eval.fid import compare

    params = load_params(args.params)
    extractor = load_extractor("imagenet", params.evaluate, device)
    n = args.eval_n
    result: dict = {"n": n, "batch": args.eval_batch, "families": {}}

    # Featurising and comparing cost the same whatever made the images: measured once on N images.
    def stand_in_images(seed: int):
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, n, args.eval_batch):
            size = min(args.eval_batch, n - start)
            # smooth random images (a blurred noise field), not white noise: a plausible spread of features
            small = torch.rand(size, 3, 8, 8, generator=generator)
            yield (torch.nn.functional.interpolate(small, size=IMAGE_SIZE, mode="bilinear") * 255).to(torch.uint8)

    times = StreamTimes()
    real = SavedStats.of(stream_features(extractor, list(stand_in_images(1)), keep=params.evaluate.keep_features, times=times))
    times = StreamTimes()
    generated = SavedStats.of(stream_features(extractor, list(stand_in_images(2)), keep=params.evaluate.keep_features, times=times))
    result["featurise_s"] = times.featurising
    start = time.perf_counter()
    metrics = compare(real, generated, extractor.suffix, params)
    result["compare_s"] = time.perf_counter() - start
    result["compare_metrics"] = sorted(metrics)
    print(f"  featurising {n} images: {result['featurise_s']:.1f} s; FD+KID+precision/recall: {result['compare_s']:.1f} s", flush=True)
    report.add("evaluation", result)

    for family in args.families:
        if time.monotonic() > args.deadline:
            result["families"][family] = {"skipped": "out of time"}
            continue
        try:
            model, _ = build(family, args, device)
            model.eval()
            generator = torch.Generator(device).manual_seed(0)
            cond = torch.randint(0, 2, (args.eval_batch, 40), device=device).float() if model.conditional else None
            kwargs = {"cond": cond} if model.conditional else {}
            model.sample(2, generator=generator, **({"cond": cond[:2]} if model.conditional else {}))  # warm-up
            synchronize(device)
            drawn, start = 0, time.perf_counter()
            while drawn < n and time.perf_counter() - start < args.sample_cap:
                drawn += len(model.sample(min(args.eval_batch, n - drawn), generator=generator, **kwargs))
                synchronize(device)
            rate = drawn / (time.perf_counter() - start)
            sampling_s = n / rate
            row = {"drawn": drawn, "sample_images_per_s": rate, "sampling_s_for_n": sampling_s,
                   "extrapolated": drawn < n, "evaluation_s_for_n": sampling_s + result["featurise_s"] + result["compare_s"]}
        except Exception as err:
            row = {"error": f"{type(err).__name__}: {err}"[:500]}
            traceback.print_exc()
        result["families"][family] = row
        print(f"  {family:<9} {json.dumps(row)}", flush=True)
        report.add("evaluation", result)


# ddp last: were NCCL's start to hang, the figures before it are already written.
SECTIONS = {"training": section_training, "ddpm_sampling": section_ddpm_sampling, "evaluation": section_evaluation,
            "ddp": section_ddp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU check: batch 4, 1 timed step, 8 evaluation images")
    parser.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    parser.add_argument("--families", nargs="*", default=list(FAMILY_NAMES))
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--batch", type=int, default=0, help="training batch (default: 256; ddpm 128)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--ddpm-sample-n", type=int, default=128)
    parser.add_argument("--eval-n", type=int, default=10_000)
    parser.add_argument("--eval-batch", type=int, default=500)
    parser.add_argument("--sample-cap", type=float, default=15.0, help="seconds of sampling per family at most")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later rows are skipped after it")
    parser.add_argument("--json", help="write the figures here, section by section")
    args = parser.parse_args()
    args.deadline = time.monotonic() + args.budget
    if args.smoke:
        args.batch, args.steps, args.warmup, args.ddpm_sample_n = 4, 1, 1, 2
        args.eval_n, args.eval_batch, args.sample_cap = 8, 4, 5.0
        torch.set_num_threads(1)  # on a shared CPU, more threads than free cores spin and stall
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu.py: no CUDA device; run with --smoke on a CPU")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    commit = os.popen(f"git -C {Path(__file__).resolve().parents[1]} rev-parse --short HEAD 2>/dev/null").read().strip()
    header = {"device": where, "torch": torch.__version__, "commit": commit, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
              "float32_matmul_precision": torch.get_float32_matmul_precision(), "smoke": args.smoke}
    print(json.dumps(header), flush=True)
    report = Report(args.json, header)
    for name in args.sections:
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        try:
            SECTIONS[name](args, device, report)
        except Exception:
            traceback.print_exc()
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
