import csv
import hashlib
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from genflow.data import synth
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.data.synth import sample_attributes, write_sample


def digest(folder):
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)).hexdigest()


def test_official_layout_matches_the_release(tmp_path):
    write_sample(tmp_path / "s", n=12, seed=0)
    root = tmp_path / "s"
    assert sorted(p.name for p in root.iterdir()) == [
        "identity_CelebA.txt",
        "img_align_celeba",
        "list_attr_celeba.txt",
        "list_bbox_celeba.txt",
        "list_eval_partition.txt",
        "list_landmarks_align_celeba.txt",
    ]
    images = sorted((root / "img_align_celeba").iterdir())
    assert [p.name for p in images] == [f"{i:06d}.jpg" for i in range(1, 13)]
    with Image.open(images[0]) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (178, 218), "RGB")

    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    assert lines[0] == "12"
    assert lines[1] == " ".join(ATTRIBUTE_NAMES) + " "
    assert all(re.fullmatch(r"\d{6}\.jpg( (-1| 1)){40}", line) for line in lines[2:]), lines[2]
    assert len(lines) == 14
    assert (root / "list_eval_partition.txt").read_text().splitlines()[0] == "000001.jpg 0"
    assert re.fullmatch(r"000001\.jpg \d+", (root / "identity_CelebA.txt").read_text().splitlines()[0])
    bbox = (root / "list_bbox_celeba.txt").read_text().splitlines()
    assert bbox[:2] == ["12", "image_id x_1 y_1 width height"] and bbox[2].split()[0] == "000001.jpg"
    marks = (root / "list_landmarks_align_celeba.txt").read_text().splitlines()
    assert marks[1].split() == synth.LANDMARK_NAMES and len(marks[2].split()) == 11


def test_zip_and_kaggle_layouts(tmp_path):
    write_sample(tmp_path / "z", n=5, layout="zip")
    with zipfile.ZipFile(tmp_path / "z" / "img_align_celeba.zip") as archive:
        assert archive.namelist() == [f"img_align_celeba/{i:06d}.jpg" for i in range(1, 6)]
    assert (tmp_path / "z" / "list_attr_celeba.txt").is_file()
    assert not (tmp_path / "z" / "img_align_celeba").exists()

    write_sample(tmp_path / "k", n=5, layout="kaggle")
    root = tmp_path / "k"
    assert len(list((root / "img_align_celeba" / "img_align_celeba").glob("*.jpg"))) == 5
    with open(root / "list_attr_celeba.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", *ATTRIBUTE_NAMES] and rows[1][0] == "000001.jpg"
    assert set(rows[1][1:]) <= {"-1", "1"}
    for stem, header in [
        ("list_eval_partition", ["image_id", "partition"]),
        ("list_bbox_celeba", ["image_id", "x_1", "y_1", "width", "height"]),
        ("list_landmarks_align_celeba", ["image_id", *synth.LANDMARK_NAMES]),
    ]:
        with open(root / f"{stem}.csv") as f:
            assert next(csv.reader(f)) == header


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    write_sample(tmp_path / "a", n=8, seed=1)
    write_sample(tmp_path / "b", n=8, seed=1)
    write_sample(tmp_path / "c", n=8, seed=2)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def fail_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_draw(*args)

    real_draw = synth.draw_face
    monkeypatch.setattr(synth, "draw_face", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_sample(tmp_path / "s", n=5)
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_the_old_sample(tmp_path):
    write_sample(tmp_path / "s", n=6)
    write_sample(tmp_path / "s", n=3)
    assert len(list((tmp_path / "s" / "img_align_celeba").iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_attributes_have_celeba_like_frequencies_and_dependencies():
    attrs = sample_attributes(20_000, np.random.default_rng(0)) > 0
    a = {name: attrs[:, i] for i, name in enumerate(ATTRIBUTE_NAMES)}
    hair = np.stack([a[n] for n in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")])
    assert hair.sum(0).max() == 1  # one hair colour at most
    assert not (a["Bald"] & hair.any(0)).any() and not (a["Bald"] & a["Bangs"]).any()
    assert not (a["Straight_Hair"] & a["Wavy_Hair"]).any()
    beard = a["Goatee"] | a["Mustache"] | a["Sideburns"] | a["5_o_Clock_Shadow"] | ~a["No_Beard"]
    assert not (beard & ~a["Male"]).any()
    assert not ((a["Goatee"] | a["Mustache"]) & a["No_Beard"]).any()
    for name, celeba_frequency in [("Male", 0.42), ("Smiling", 0.48), ("Young", 0.77), ("No_Beard", 0.83), ("Eyeglasses", 0.065)]:
        assert abs(a[name].mean() - celeba_frequency) < 0.03, name
    assert a["Wearing_Lipstick"][~a["Male"]].mean() > 0.6 > a["Wearing_Lipstick"][a["Male"]].mean()


def test_images_show_their_attributes(tmp_path):
    write_sample(tmp_path / "s", n=400, seed=0)
    lines = (tmp_path / "s" / "list_attr_celeba.txt").read_text().splitlines()[2:]
    attrs = np.array([[int(v) > 0 for v in line.split()[1:]] for line in lines])
    a = {name: attrs[:, i] for i, name in enumerate(ATTRIBUTE_NAMES)}
    images = np.stack([np.asarray(Image.open(p), np.float32) for p in sorted((tmp_path / "s" / "img_align_celeba").iterdir())])

    # Above the forehead (hats and bald heads left out): the hair's colour.
    top_of_head = images[:, 50:58, 75:103].mean(axis=(1, 2, 3))
    visible = ~a["Wearing_Hat"] & ~a["Bald"]
    blond, black = top_of_head[visible & a["Blond_Hair"]], top_of_head[visible & a["Black_Hair"]]
    assert len(blond) > 10 and len(black) > 10
    assert blond.mean() > black.mean() + 100

    # Around the eyes: frames darken the region.
    eyes = images[:, 100:122, 56:122].mean(axis=(1, 2, 3))
    assert eyes[a["Eyeglasses"]].mean() < eyes[~a["Eyeglasses"]].mean() - 20

    # Lips: red with lipstick.
    lips = images[:, 147:158, 74:104]
    redness = (lips[..., 0] - lips[..., 1]).mean(axis=(1, 2))
    assert redness[a["Wearing_Lipstick"]].mean() > redness[~a["Wearing_Lipstick"]].mean() + 15
