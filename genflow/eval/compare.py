"""`genflow report` (DVC stage `report`): every evaluated family side by side.

    genflow report            -> reports/index.md, reports/index.html (self-contained), reports/*.png

- a table of each family's test metrics (metrics/evaluate/FAMILY.json, what evaluate@FAMILY wrote);
- the generative-learning trilemma (Xiao et al. 2022) as measured here: sample quality (fd_effnet,
  lower is better) against sampling speed (images/s, log scale), diversity (recall_effnet) as colour;
- a grid of samples per family (its run's evaluation/samples.png);
- for families with a latent posterior (the VAE's interface: `encode` -> (posterior mean,
  log-variance), `decode` -> per-pixel logits): interpolations between test faces,
  and attribute vectors (Upchurch et al. 2017 / Larsen et al. 2016: mean latent of test faces with
  the attribute minus the mean of those without) moving one face along Smiling, Eyeglasses, Male.

Families that have not been evaluated are left out; the page renders with any subset (or none).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from genflow.config import Params
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.images import image_grid

REPORT_DIR = Path("reports")
METRICS_DIR = Path("metrics/evaluate")
LATENT_ATTRIBUTES = ("Smiling", "Eyeglasses", "Male")
STEPS = 8  # images per interpolation row

# Table columns: (metrics key, heading, format). A family without a key shows "–".
COLUMNS = (
    ("fd_effnet", "FD EffNet ↓", "{:.2f}"),
    ("fd_effnet_n", "n", "{:.0f}"),
    ("kid_effnet", "KID EffNet ↓", "{:.4f}"),
    ("precision_effnet", "precision ↑", "{:.3f}"),
    ("recall_effnet", "recall ↑", "{:.3f}"),
    ("bits_per_dim", "bits/dim ↓", "{:.3f}"),
    ("reconstruction_psnr", "PSNR dB ↑", "{:.2f}"),
    ("reconstruction_ssim", "SSIM ↑", "{:.3f}"),
    ("attribute_match", "attr. match ↑", "{:.3f}"),
    ("sample_images_per_s", "sampling img/s ↑", "{:.4g}"),
    ("train_images_per_s", "training img/s ↑", "{:.4g}"),
    ("parameters", "parameters", "{:,.0f}"),
)


@dataclass
class FamilyResult:
    name: str
    metrics: dict[str, float]
    samples: Image.Image | None = None  # the evaluation grid
    model: torch.nn.Module | None = None  # for latent pictures, where the family has a latent space


def collect(params: Params, metrics_dir: Path = METRICS_DIR, log=print) -> list[FamilyResult]:
    """Every family with an evaluate@FAMILY metrics file, with its sample grid and model from MLflow."""
    import mlflow

    from genflow.eval.report import load_trained_model
    from genflow.models.families import FAMILY_NAMES
    from genflow.track import mlflow as tracking

    tracking.configure(params.tracking)
    results = []
    for family in FAMILY_NAMES:
        path = metrics_dir / f"{family}.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        result = FamilyResult(family, metrics)
        run_id = metrics.get("run_id")
        if run_id:
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="evaluation/samples.png")
                result.samples = Image.open(local).convert("RGB")
                result.model = load_trained_model(run_id)
            except Exception as err:  # a run deleted or moved: the table still stands
                log(f"report: {family}: run {run_id} unavailable ({err}); table row only")
        results.append(result)
    return results


def has_latent_space(model) -> bool:
    return model is not None and callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))


@torch.no_grad()
def _latents(model, images: torch.Tensor) -> torch.Tensor | None:
    """Posterior means, or None where `encode` is not a posterior's (mean, log-variance)."""
    encoded = model.encode(images.to(model.device()))
    return encoded[0] if isinstance(encoded, tuple) and len(encoded) == 2 else None


@torch.no_grad()
def _decode(model, z: torch.Tensor) -> torch.Tensor:
    return model.to_uint8(torch.sigmoid(model.decode(z))).cpu()


def first_test_faces(shards: str | Path, n: int, image_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split's first `n` images (in the model's range) and their attributes."""
    from genflow.data.loader import eval_loader

    images, attrs = [], []
    for batch_images, batch_attrs in eval_loader(shards, split="test", batch_size=min(n, 256), image_range=image_range):
        images.append(batch_images)
        attrs.append(batch_attrs)
        if sum(len(b) for b in images) >= n:
            break
    return torch.cat(images)[:n], torch.cat(attrs)[:n]


def latent_pictures(model, images: torch.Tensor, attrs: torch.Tensor) -> tuple[Image.Image, Image.Image, list[str]] | None:
    """(interpolations between pairs of test faces, one face moved along each attribute vector,
    the attributes shown), or None where the model has no posterior. Rows of STEPS images; the
    ends of an interpolation are the decoded latents of the two faces, α runs from -1 (attribute
    removed) to 2 along a vector."""
    z = _latents(model, images)
    if z is None:
        return None
    rows = []
    for a, b in ((0, 1), (2, 3), (4, 5)):
        if b < len(z):
            t = torch.linspace(0, 1, STEPS, device=z.device)[:, None]
            rows.append(_decode(model, (1 - t) * z[a] + t * z[b]))
    interpolations = image_grid(torch.cat(rows), columns=STEPS)
    moved, shown = [], []
    for name in LATENT_ATTRIBUTES:
        column = attrs[:, ATTRIBUTE_NAMES.index(name)].bool().to(z.device)
        if column.all() or not column.any():
            continue  # no contrast in these faces: no vector
        vector = z[column].mean(0) - z[~column].mean(0)
        alphas = torch.linspace(-1, 2, STEPS, device=z.device)[:, None]
        moved.append(_decode(model, z[0] + alphas * vector))
        shown.append(name)
    attribute_rows = image_grid(torch.cat(moved), columns=STEPS) if moved else None
    return interpolations, attribute_rows, shown


def trilemma_plot(results: list[FamilyResult]) -> Image.Image | None:
    """Quality (fd_effnet) against sampling speed, coloured by diversity (recall_effnet)."""
    points = [r for r in results if "fd_effnet" in r.metrics and "sample_images_per_s" in r.metrics]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    speeds = [r.metrics["sample_images_per_s"] for r in points]
    quality = [r.metrics["fd_effnet"] for r in points]
    recall = [r.metrics.get("recall_effnet", math.nan) for r in points]
    scatter = axes.scatter(speeds, quality, c=recall, cmap="viridis", vmin=0, vmax=1, s=120, edgecolors="black")
    for r, x, y in zip(points, speeds, quality):
        axes.annotate(r.name, (x, y), textcoords="offset points", xytext=(7, 5))
    axes.set_xscale("log")
    axes.margins(x=0.3, y=0.15)  # room for the labels
    axes.invert_yaxis()  # better quality upwards
    axes.set_xlabel("sampling speed (images/s, log scale) →")
    axes.set_ylabel("← FD EffNet (lower = better quality)")
    axes.set_title("The generative trilemma, measured (Xiao et al. 2022)")
    figure.colorbar(scatter, ax=axes, label="diversity: recall EffNet")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _cell(metrics: dict, key: str, pattern: str) -> str:
    value = metrics.get(key)
    return pattern.format(value) if isinstance(value, (int, float)) and not math.isnan(value) else "–"


def _primary(family: str) -> str:
    from genflow.models.families import get_family

    try:
        model_class = get_family(family)
    except ValueError:
        return "?"
    return f"{model_class.primary_metric} ({'↓' if model_class.primary_metric_lower_is_better else '↑'})"


def build_report(results: list[FamilyResult], out_dir: Path, shards: str | Path | None) -> dict[str, Path]:
    """Write index.md, index.html and the pictures into `out_dir`; returns what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, tuple[Image.Image, str]] = {}  # file name -> (image, caption)
    plot = trilemma_plot(results)
    if plot is not None:
        pictures["trilemma.png"] = (plot, "Quality against speed, colour = diversity (recall)")
    for r in results:
        if r.samples is not None:
            pictures[f"samples_{r.name}.png"] = (r.samples, f"{r.name}: samples")
        if has_latent_space(r.model) and shards is not None:
            images, attrs = first_test_faces(shards, 256, r.model.image_range)
            pictured = latent_pictures(r.model.eval(), images, attrs)
            if pictured is None:
                continue
            interpolations, moved, shown = pictured
            pictures[f"interpolations_{r.name}.png"] = (interpolations, f"{r.name}: interpolations between test faces")
            if moved is not None:
                caption = f"{r.name}: one test face along attribute vectors (rows: {', '.join(shown)}; α from −1 to 2)"
                pictures[f"attributes_{r.name}.png"] = (moved, caption)

    heading = ["family", "primary metric"] + [c[1] for c in COLUMNS]
    rows = [[r.name, _primary(r.name)] + [_cell(r.metrics, key, pattern) for key, _, pattern in COLUMNS] for r in results]
    intro = (f"{len(results)} famil{'y' if len(results) == 1 else 'ies'} evaluated: {', '.join(r.name for r in results)}."
             if results else "No family evaluated yet: run `dvc repro` (or `genflow evaluate FAMILY`).")
    note = ("FD/KID/precision/recall on EfficientNet-Lite0 ImageNet features (not Inception: not comparable with "
            "published FIDs), generated samples against as many test images (n).")

    markdown = ["# genflow: every family side by side", "", intro, "", note, ""]
    if rows:
        markdown += ["| " + " | ".join(heading) + " |", "|" + "---|" * len(heading)]
        markdown += ["| " + " | ".join(row) + " |" for row in rows]
        markdown.append("")
    for name, (image, caption) in pictures.items():
        image.save(out_dir / name)
        markdown += [f"## {caption}", "", f"![{caption}]({name})", ""]
    (out_dir / "index.md").write_text("\n".join(markdown))

    body = [f"<h1>genflow: every family side by side</h1><p>{html.escape(intro)}</p><p>{html.escape(note)}</p>"]
    if rows:
        body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in heading) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        body.append("</table>")
    for name, (image, caption) in pictures.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        body.append(f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
             "img{image-rendering:pixelated;max-width:100%}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>genflow report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    (out_dir / "index.html").write_text(page)
    return {"md": out_dir / "index.md", "html": out_dir / "index.html", **{n: out_dir / n for n in pictures}}


def report(params: Params, out_dir: Path = REPORT_DIR, metrics_dir: Path = METRICS_DIR) -> dict[str, Path]:
    """Collect, build, and log the report to an MLflow run named "report"."""
    import mlflow

    from genflow.provenance import provenance_tags
    from genflow.track import mlflow as tracking

    results = collect(params, metrics_dir)
    written = build_report(results, out_dir, params.data.shards)
    experiment_id = tracking.configure(params.tracking)
    with mlflow.start_run(experiment_id=experiment_id, run_name="report",
                          tags={"genflow.role": "report", **provenance_tags()}):
        mlflow.log_artifacts(str(out_dir), artifact_path="report")
        for r in results:
            for key in ("fd_effnet", "recall_effnet", "precision_effnet", "sample_images_per_s"):
                if isinstance(r.metrics.get(key), (int, float)):
                    mlflow.log_metric(f"{r.name}/{key}", float(r.metrics[key]))
    return written
