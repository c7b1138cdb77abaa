"""ddpm at the reference preset's scale on one GPU: training images/s in plain fp32 against bf16
autocast + channels_last + torch.compile + fused Adam (and the steps between), the peak memory of
each, whether batch 128 fits, and DDIM-50 sampling images/s in bf16 and fp32 with how far apart
the two samplers' images are. One run, ratios printed side by side.

    python benchmarks/gpu_ddpm.py                      # GPU: reference preset, batch 128
    python benchmarks/gpu_ddpm.py --json $OUT/gpu_ddpm.json
    python benchmarks/gpu_ddpm.py --smoke              # CPU: tiny preset, batch 4, 2 steps: it runs

The step timed is the protocol's, as the loop runs it: training_step → backward → clip (1.0) →
Adam(2e-4) step → after_step (EMA). "fp32" is PyTorch's defaults (cuDNN convolutions may use
TF32, matmuls do not; printed). Targets (issue 10): the fast row ≥ 2× fp32; batch 128 fits 80 GB.
Untrained weights, except the output conv, drawn as a trained model's would be non-zero, so that
the bf16-vs-fp32 sample comparison compares something (or `--model model.pt`, a trained one).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

from genflow.models.ddpm import DDPM, DDPMConfig
from genflow.models.protocol import Batch
from genflow.models.saved import load_model


@dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool = False
    channels_last: bool = False
    fused: bool = False
    compile: bool = False


VARIANTS = [
    Variant("fp32"),
    Variant("bf16", bf16=True),
    Variant("bf16+channels_last+fused", bf16=True, channels_last=True, fused=True),
    Variant("bf16+channels_last+fused+compile", bf16=True, channels_last=True, fused=True, compile=True),
]


def build(args, device: torch.device) -> DDPM:
    if args.model:
        return load_model(args.model, device).train()
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(preset=args.preset)).to(device)
    with torch.no_grad():  # a non-zero output layer (both copies), as after training
        for net in (model.unet, model.ema):
            torch.nn.init.normal_(net.head[-1].weight, std=0.02)
    return model.train()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_speed(args, device: torch.device, variant: Variant) -> dict:
    model = build(args, device)
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if variant.compile:
        model.unet.compile()  # in place: parameter names (and the EMA's zip over them) unchanged
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=2e-4, fused=variant.fused or None)
    images = (torch.rand(args.batch, 3, 64, 64, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    batch = Batch(images, torch.zeros(args.batch, 40, device=device))

    def step(k: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            losses = model.training_step(batch, k)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        optimizer.step()
        model.after_step(k + 1)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        start = time.perf_counter()
        for k in range(args.warmup):  # compilation, cuDNN autotuning, allocator
            step(k)
        synchronize(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for k in range(args.steps):
            step(args.warmup + k)
        synchronize(device)
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return {"variant": variant.name, "fits": False}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"variant": variant.name, "fits": True, "images_per_s": args.batch * args.steps / elapsed,
            "peak_gib": peak, "warmup_s": warmup_s}


def sampling_speed(args, device: torch.device) -> list[dict]:
    model = build(args, device).eval()
    rows, images = [], {}
    for bf16 in (False, True):
        model.config.sample_bf16 = bf16
        model.sample(2, generator=torch.Generator(device).manual_seed(1), sampler="ddim", steps=2)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        images[bf16] = model.sample(args.sample_n, generator=torch.Generator(device).manual_seed(0), sampler="ddim", steps=50, eta=0.0)
        synchronize(device)
        elapsed = time.perf_counter() - start
        rows.append({"sampler": "DDIM-50", "bf16": bf16 and device.type == "cuda", "images_per_s": args.sample_n / elapsed})
    difference = (images[True].int() - images[False].int()).abs().float()
    rows[-1]["mean_abs_pixel_difference_vs_fp32"] = difference.mean().item()
    rows[-1]["max_abs_pixel_difference_vs_fp32"] = difference.max().item()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, batch 4, 2 steps, 4 samples")
    parser.add_argument("--preset", default="reference", choices=["tiny", "reference"])
    parser.add_argument("--model", help="a trained model.pt instead of initial weights")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sample-n", type=int, default=128)
    parser.add_argument("--variants", nargs="*", help="only these variants (names as printed)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.batch, args.steps, args.warmup, args.sample_n = "tiny", 4, 2, 1, 4
        torch.set_num_threads(1)  # on a shared CPU, more threads than free cores spin and stall
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu_ddpm: no CUDA device; run with --smoke on a CPU")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, preset {args.preset}, batch {args.batch}; "
          f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, matmul precision={torch.get_float32_matmul_precision()}")

    variants = [v for v in VARIANTS if not args.variants or v.name in args.variants]
    training = [train_speed(args, device, v) for v in variants]
    base = next((r for r in training if r["variant"] == "fp32" and r["fits"]), None)
    print(f"\n{'training step':<36} {'images/s':>10} {'vs fp32':>8} {'peak GiB':>9} {'warm-up s':>10}")
    for row in training:
        if not row["fits"]:
            print(f"{row['variant']:<36} {'out of memory at batch ' + str(args.batch):>40}")
            continue
        ratio = f"{row['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        print(f"{row['variant']:<36} {row['images_per_s']:>10.1f} {ratio:>8} {row['peak_gib']:>9.2f} {row['warmup_s']:>10.1f}")
    print(f"batch {args.batch} fits: {'yes' if all(r['fits'] for r in training) else 'NO for ' + ', '.join(r['variant'] for r in training if not r['fits'])}")

    sampling = sampling_speed(args, device)
    print(f"\n{'sampling':<36} {'images/s':>10}")
    for row in sampling:
        print(f"{row['sampler'] + (' bf16' if row['bf16'] else ' fp32'):<36} {row['images_per_s']:>10.2f}")
    last = sampling[-1]
    print(f"bf16 vs fp32 samples (same noise): mean |Δpixel| {last['mean_abs_pixel_difference_vs_fp32']:.2f}, "
          f"max {last['max_abs_pixel_difference_vs_fp32']:.0f} (of 255)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "preset": args.preset, "batch": args.batch, "training": training, "sampling": sampling}, f, indent=2)


if __name__ == "__main__":
    main()
