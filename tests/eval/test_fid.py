"""`genflow fid`: folders, shard splits and saved statistics give the same distances."""

import re

import numpy as np
import pytest
from PIL import Image

from genflow.cli import main
from genflow.eval.fid import Source


def write_folder(folder, seed, n=6, red=200):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(n):
        pixels = (rng.normal(size=(64, 64, 3)) * 30 + [red, 90, 90]).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def fd_of(output: str) -> float:
    return float(re.search(r"^fd_effnet: (\S+)", output, re.M).group(1))


def defaults(tmp_path) -> str:
    """An empty params file: the embedded defaults, whatever ./params.yaml holds (a missing --params is an error)."""
    path = tmp_path / "params.yaml"
    path.write_text("")
    return str(path)


def run(capsys, tmp_path, *args) -> str:
    assert main(["fid", *args, "--params", defaults(tmp_path)]) == 0
    return capsys.readouterr().out


def test_two_folders_and_their_saved_stats_give_the_same_distance(tmp_path, capsys):
    a, b = write_folder(tmp_path / "a", 0), write_folder(tmp_path / "b", 1, red=120)
    direct = run(capsys, tmp_path, str(a), str(b))
    assert {"fd_effnet", "kid_effnet", "precision_effnet", "recall_effnet"} <= set(re.findall(r"^(\w+):", direct, re.M))
    run(capsys, tmp_path, str(a), "--save-stats", str(tmp_path / "a.npz"))
    run(capsys, tmp_path, str(b), "--save-stats", str(tmp_path / "b.npz"))
    with np.load(tmp_path / "a.npz") as saved:
        assert sorted(saved.files) == ["mu", "sigma"] and saved["sigma"].dtype == np.float64
    from_stats = run(capsys, tmp_path, str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    assert fd_of(from_stats) == pytest.approx(fd_of(direct), rel=1e-9)
    assert fd_of(direct) > 0
    assert "kid_effnet" not in from_stats  # statistics alone carry no features for KID


def test_sources_are_recognised(tmp_path, eval_shards):
    assert Source.parse(f"{eval_shards}:train") == Source("shards", str(eval_shards), "train")
    assert Source.parse(str(eval_shards)).split == "test"
    assert Source.parse("celeba64-vae@staging").kind == "model"
    with pytest.raises(FileNotFoundError, match="not a folder of images"):
        Source.parse(str(tmp_path / "nothing"))


def test_bad_input_ends_with_one_clear_line(tmp_path, capsys):
    folder = write_folder(tmp_path / "mixed", 0, n=2)
    Image.new("RGB", (32, 32)).save(folder / "small.png")
    assert main(["fid", str(folder), "--save-stats", str(tmp_path / "x.npz"), "--params", defaults(tmp_path)]) == 2
    assert "must have one size" in capsys.readouterr().err
    assert main(["fid", str(folder), "--params", defaults(tmp_path)]) == 2
    assert "give two sets" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_a_registered_model_is_sampled_on_the_fly(tmp_path, capsys, monkeypatch):
    from genflow.eval import fid as fid_module
    from tests.eval.test_quality import tiny_vae

    loaded = []
    monkeypatch.setattr(fid_module, "load_registered", lambda params, reference, device: loaded.append(reference) or tiny_vae())
    folder = write_folder(tmp_path / "a", 0, n=4)
    output = run(capsys, tmp_path, "celeba64-vae@staging", str(folder), "--n", "4")
    assert loaded == ["celeba64-vae@staging"]
    assert "(n = 4 vs 4)" in output and fd_of(output) > 0
