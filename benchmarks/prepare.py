"""Prepare's speed side by side with a straightforward script and the JPEG-decode floor.

    python benchmarks/prepare.py [--n 3000] [--repeats 5]

On one synthetic sample (genflow data synth), measured in one run, interleaved, best of
--repeats for each (the machine may be shared and noisy):
  genflow          genflow.data.shards.prepare with data.processes=0 (one process per core), end to end
  straightforward  one process: PIL open -> convert RGB -> centre crop -> resize 64 LANCZOS -> save PNG
  decode floor     one process decoding each full-size JPEG and nothing else, with PIL and with
                   simplejpeg; the floor for the machine is that rate x cores. For how well this
                   machine scales, the PIL decode is also run in one process per core at once.
Targets: genflow >= 3x straightforward, and >= 60% of the decode floor x cores.
It also prints the CPU time each spends per image (all processes, best run), which a shared
machine's other load does not distort: decode CPU / genflow CPU is the fraction of the floor
genflow reaches on idle cores. And how close genflow's images are to the straightforward
script's (PSNR).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import tarfile
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from genflow.config import DataParams
from genflow.data.celeba import IMAGE_SIZE
from genflow.data.shards import prepare
from genflow.data.synth import write_sample

CROP, SIZE = 148, 64


def run_genflow(source: Path, out: Path, n: int) -> None:
    # Each process writes whole shards: cut the sample into ~12 shards so that the processes
    # share the work as evenly as on CelebA (42 shards of 5000).
    prepare(DataParams(source=str(source), shards=str(out), crop=CROP, size=SIZE, processes=0, shard_size=max(1, n // 12)))


def run_straightforward(images: list[Path], out: Path) -> None:
    out.mkdir(exist_ok=True)
    left, top = (IMAGE_SIZE[0] - CROP) // 2, (IMAGE_SIZE[1] - CROP) // 2
    for path in images:
        image = Image.open(path).convert("RGB").crop((left, top, left + CROP, top + CROP))
        image.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(out / f"{path.stem}.png")


def decode_pil(images: list[Path]) -> None:
    for path in images:
        with Image.open(path) as image:
            image.load()


def decode_pil_on_every_core(images: list[Path], cores: int) -> None:
    with Pool(cores) as pool:
        pool.map(decode_pil, [images[i::cores] for i in range(cores)])


def decode_simplejpeg(images: list[Path]) -> None:
    for path in images:
        simplejpeg.decode_jpeg(path.read_bytes(), "RGB")


def psnr_against_straightforward(shards: Path, pngs: Path) -> float:
    errors = []
    for shard in sorted((shards / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".ppm"):
                    ours = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())), np.float64)
                    theirs = np.asarray(Image.open(pngs / member.name.replace(".ppm", ".png")), np.float64)
                    errors.append(np.mean((ours - theirs) ** 2))
    return float(10 * np.log10(255**2 / np.mean(errors)))


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (prepare's pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="images in the synthetic input")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))  # what prepare runs with: one process per usable core

    with tempfile.TemporaryDirectory(prefix="genflow-bench-") as tmp:
        tmp = Path(tmp)
        write_sample(tmp / "sample", n=args.n, seed=0)
        images = sorted((tmp / "sample" / "img_align_celeba").glob("*.jpg"))
        runs = {
            "genflow": lambda: run_genflow(tmp / "sample", tmp / "shards", args.n),
            "straightforward": lambda: run_straightforward(images, tmp / "pngs"),
            "decode floor, PIL": lambda: decode_pil(images),
            "decode floor, simplejpeg": lambda: decode_simplejpeg(images),
            "decode, PIL, every core": lambda: decode_pil_on_every_core(images, cores),
        }
        best = {name: float("inf") for name in runs}
        best_cpu = dict(best)
        for _ in range(args.repeats):
            for name, run in runs.items():
                start, start_cpu = time.perf_counter(), cpu_seconds()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
                best_cpu[name] = min(best_cpu[name], cpu_seconds() - start_cpu)
        rate = {name: args.n / seconds for name, seconds in best.items()}
        cpu_us = {name: seconds / args.n * 1e6 for name, seconds in best_cpu.items()}
        psnr = psnr_against_straightforward(tmp / "shards", tmp / "pngs")

    print(f"\n{args.n} synthetic 178x218 JPEGs, {cores} cores, best of {args.repeats} (images/s):")
    print(f"  genflow prepare ({cores} processes)        {rate['genflow']:9.0f}")
    print(f"  straightforward (1 process, PIL)      {rate['straightforward']:9.0f}")
    print(f"  decode only, PIL (1 process)          {rate['decode floor, PIL']:9.0f}   x {cores} cores = {rate['decode floor, PIL'] * cores:.0f}")
    print(f"  decode only, simplejpeg (1 process)   {rate['decode floor, simplejpeg']:9.0f}   x {cores} cores = {rate['decode floor, simplejpeg'] * cores:.0f}")
    print(f"  decode only, PIL ({cores} processes at once)  {rate['decode, PIL, every core']:9.0f}   (the machine's scaling: {rate['decode, PIL, every core'] / rate['decode floor, PIL']:.2f}x)")
    checks = [
        ("genflow / straightforward", rate["genflow"] / rate["straightforward"], 3.0, "x"),
        ("genflow / (PIL decode floor x cores)", rate["genflow"] / (rate["decode floor, PIL"] * cores), 0.6, ""),
        ("genflow / (simplejpeg decode floor x cores)", rate["genflow"] / (rate["decode floor, simplejpeg"] * cores), 0.6, ""),
    ]
    for name, ratio, target, unit in checks:
        verdict = "meets" if ratio >= target else "MISSES"
        print(f"  {name:44s} {ratio:6.2f}{unit or ' '}  target >= {target}{unit}: {verdict}")
    print(f"  genflow / PIL decode in {cores} processes at once (what this machine gave)  {rate['genflow'] / rate['decode, PIL, every core']:.2f}")
    print("  CPU time per image, all processes: " + ", ".join(f"{name} {us:.0f} us" for name, us in cpu_us.items() if "every" not in name))
    for floor in ("decode floor, PIL", "decode floor, simplejpeg"):
        print(f"  on idle cores genflow would reach {cpu_us[floor] / cpu_us['genflow']:.2f} of the {floor.split(', ')[1]} floor x cores")
    print(f"  genflow's 64x64 images vs the straightforward script's: PSNR {psnr:.1f} dB")


if __name__ == "__main__":
    main()
