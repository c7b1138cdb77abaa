"""`genflow report`: renders with any subset of families, pictures inlined in the HTML."""

import re

import pytest
import torch

from genflow.eval.compare import FamilyResult, build_report, latent_pictures, STEPS
from genflow.images import image_grid
from tests.eval.test_quality import tiny_vae


def metrics(fd, speed, recall):
    return {"fd_effnet": fd, "fd_effnet_n": 256, "recall_effnet": recall, "precision_effnet": 0.5,
            "sample_images_per_s": speed, "parameters": 1000}


def grid():
    return image_grid(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))


@pytest.mark.parametrize("families", [[], ["vae"], ["dcgan", "ddpm"], ["vae", "dcgan", "ddpm", "flow"]])
def test_report_renders_with_any_subset_of_families(tmp_path, families):
    results = [FamilyResult(name, metrics(10.0 * (i + 1), 10.0 ** (3 - i), 0.2 * (i + 1)), samples=grid())
               for i, name in enumerate(families)]
    written = build_report(results, tmp_path, shards=None)
    page = written["html"].read_text()
    markdown = written["md"].read_text()
    for name in families:
        assert f"<td>{name}</td>" in page and f"| {name} |" in markdown
        assert (tmp_path / f"samples_{name}.png").is_file()
    inlined = re.findall(r"src='data:image/png;base64,", page)
    assert len(inlined) == len(families) + (1 if families else 0)  # grids + the trilemma plot
    assert "src='http" not in page and "src=\"http" not in page  # self-contained
    if not families:
        assert "No family evaluated yet" in page


def test_a_row_without_quality_metrics_shows_dashes(tmp_path):
    written = build_report([FamilyResult("vae", {"bits_per_dim": 5.5})], tmp_path, shards=None)
    assert "5.500" in written["md"].read_text() and "–" in written["md"].read_text()
    assert not (tmp_path / "trilemma.png").exists()  # nothing to plot without fd and speed


def test_latent_pictures_of_a_vae(eval_shards):
    from genflow.eval.compare import first_test_faces

    model = tiny_vae()
    images, attrs = first_test_faces(eval_shards, 24, model.image_range)
    interpolations, moved, shown = latent_pictures(model, images, attrs)
    assert interpolations.size[0] == STEPS * 66 + 2  # STEPS images of 64 px + 2 px padding per row
    assert moved is None or moved.size[1] == len(shown) * 66 + 2
    assert set(shown) <= {"Smiling", "Eyeglasses", "Male"}


def test_report_with_a_vae_draws_its_latent_space(tmp_path, eval_shards):
    written = build_report([FamilyResult("vae", metrics(5.0, 100.0, 0.5), samples=grid(), model=tiny_vae())],
                           tmp_path, shards=eval_shards)
    assert "interpolations_vae.png" in written and "attributes_vae.png" in written
