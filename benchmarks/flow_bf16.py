"""The flow's training images/s in fp32 against bf16 autocast, measured in one run, on a GPU when
there is one, else on the CPU (its sampling speed is a row of benchmarks/sampling.py).

    python benchmarks/flow_bf16.py [--batch 32] [--steps 6] [-S models.flow.key=value ...]

The flow is params.yaml's `models.flow` (the embedded defaults) with random 8-bit images: speed does
not depend on what was learned. Under bf16 autocast only the coupling nets and the prior convs run
in bf16; the 1×1 convolutions, the affine updates, the log-determinants and the Gaussian
log-densities stay in float32 (see genflow/models/flow.py, "Numerics"), so the ratio shows what
bf16 buys on the nets alone. On a CPU without bf16 matrix units the bf16 figure is slower.
"""

from __future__ import annotations

import argparse
import time

import torch

from genflow.config import load_params
from genflow.models.families import get_family
from genflow.models.flow import Flow
from genflow.models.protocol import Batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_images_per_s(model: Flow, batch: Batch, steps: int, bf16: bool) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = batch.images.device
    for step in range(steps + 2):  # two warm-up steps (allocator, kernel choice)
        if step == 2:
            synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.training_step(batch, step)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return steps * len(batch.images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = load_params("params.yaml", args.overrides).family_config("flow")
    torch.manual_seed(0)
    model = get_family("flow")(config).to(device)
    images = torch.randint(0, 256, (args.batch, 3, 64, 64), device=device).float() / 255
    batch = Batch(images, torch.zeros(args.batch, 40, device=device))
    model.initialize(batch)
    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
    print(f"flow {config.model_dump()} on {device}{threads}, {sum(p.numel() for p in model.parameters()):,} params")

    fp32 = training_images_per_s(model, batch, args.steps, bf16=False)
    bf16 = training_images_per_s(model, batch, args.steps, bf16=True)
    print(f"training, batch {args.batch}:  fp32 {fp32:8.1f} images/s   bf16 autocast {bf16:8.1f} images/s   bf16/fp32 {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
