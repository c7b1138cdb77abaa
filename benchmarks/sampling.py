"""Sampling speed, images/s, of each family's samplers side by side, and each row's speed-up over
its family's baseline row, measured in one run (this machine is shared: only ratios mean much).

    python benchmarks/sampling.py [--n 4] [--threads 1] [--repeats 2] [--families ddpm]

Models are the families' embedded configs (params.yaml, `models.FAMILY`), untrained: sampling
cost is the architecture's and the sampler's, not the weights'. Rows of a family are timed
interleaved, `--repeats` rounds, best round kept, so a load change on the machine hits every row.
Targets: ddpm DDIM-50 ≥ 15× DDPM-1000 (ideal 20×: the same U-Net, 1/20 of the evaluations).

A family adds its rows to ROWS: a label, the keyword arguments of its `sample`, and the label
of the row it is compared with (None for the baseline).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from genflow.config import load_params
from genflow.models.families import get_family


@dataclass(frozen=True)
class Row:
    family: str
    label: str
    options: dict = field(default_factory=dict)  # keyword arguments of the family's `sample`
    baseline: str | None = None  # the label of the row whose images/s this one is divided by


ROWS: list[Row] = [
    Row("ddpm", "DDPM-1000", {"sampler": "ddpm"}),
    Row("ddpm", "DDIM-50", {"sampler": "ddim", "steps": 50, "eta": 0.0}, baseline="DDPM-1000"),
    Row("flow", "T=0.7", {"temperature": 0.7}),  # one inverse pass; the temperature does not change the cost
]


def images_per_second(model, row: Row, n: int) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    images = model.sample(n, generator=generator, **row.options)
    elapsed = time.perf_counter() - start
    assert images.shape[0] == n and images.dtype == torch.uint8
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4, help="images per sample call")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is kept")
    parser.add_argument("--families", nargs="*", help="only these families (default: every family with rows)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params()

    families = sorted({row.family for row in ROWS} & set(args.families or {row.family for row in ROWS}))
    print(f"{'family':<10} {'sampler':<12} {'images/s':>10} {'s/image':>9}  speed-up")
    for family in families:
        torch.manual_seed(0)
        model = get_family(family)(params.family_config(family)).eval()
        rows = [row for row in ROWS if row.family == family]
        model.sample(1, generator=torch.Generator().manual_seed(0))  # warm-up: allocator, kernels
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for row in rows:
                best[row.label] = max(best.get(row.label, 0.0), images_per_second(model, row, args.n))
        for row in rows:
            speedup = f"{best[row.label] / best[row.baseline]:.1f}x {row.baseline}" if row.baseline else "(baseline)"
            print(f"{family:<10} {row.label:<12} {best[row.label]:>10.3f} {1 / best[row.label]:>9.2f}  {speedup}")


if __name__ == "__main__":
    main()
