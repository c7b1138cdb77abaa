"""Attribute conditions for `genflow sample --attr`: parsing, and rows drawn from the training manifest."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from genflow.data.attributes import MANIFEST_FILE, attribute_rows, parse_attribute_settings, training_attribute_table
from genflow.data.celeba import ATTRIBUTE_NAMES

SMILING, EYEGLASSES = ATTRIBUTE_NAMES.index("Smiling"), ATTRIBUTE_NAMES.index("Eyeglasses")


def write_manifest(folder, train_rows: np.ndarray, test_rows: np.ndarray) -> None:
    """A manifest as prepare writes it: key, split, shard and one bool column per attribute."""
    rows = np.concatenate([train_rows, test_rows]).astype(bool)
    splits = ["train"] * len(train_rows) + ["test"] * len(test_rows)
    table = pa.table({"key": [f"{i:06d}" for i in range(len(rows))], "split": splits, "shard": ["x"] * len(rows),
                      **{name: rows[:, i] for i, name in enumerate(ATTRIBUTE_NAMES)}})
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / MANIFEST_FILE)


def test_settings_parse_and_bad_ones_are_clear_errors():
    assert parse_attribute_settings(["Smiling=1", "Eyeglasses=0", "Smiling=1"]) == {"Smiling": 1, "Eyeglasses": 0}
    with pytest.raises(ValueError, match=r"'Smling' is not a CelebA attribute.*one of: 5_o_Clock_Shadow, .*Young"):
        parse_attribute_settings(["Smling=1"])
    with pytest.raises(ValueError, match="did you mean Smiling"):
        parse_attribute_settings(["smiling=1"])
    with pytest.raises(ValueError, match="must be 0 .absent. or 1 .present., got '-1'"):
        parse_attribute_settings(["Smiling=-1"])
    with pytest.raises(ValueError, match="not a CelebA attribute"):
        parse_attribute_settings(["Smiling"])
    with pytest.raises(ValueError, match="given twice"):
        parse_attribute_settings(["Smiling=1", "Smiling=0"])


def test_rows_keep_the_named_attributes_and_take_the_rest_from_training_images(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 2, (5, len(ATTRIBUTE_NAMES)))
    test = np.ones((3, len(ATTRIBUTE_NAMES)))  # never drawn: not training images
    write_manifest(tmp_path, train, test)
    table = training_attribute_table(tmp_path)
    assert torch.equal(table, torch.from_numpy(train).float())

    rows = attribute_rows({"Smiling": 1, "Eyeglasses": 0}, tmp_path, 64, torch.Generator().manual_seed(0))
    assert rows.shape == (64, len(ATTRIBUTE_NAMES))
    assert (rows[:, SMILING] == 1).all() and (rows[:, EYEGLASSES] == 0).all()
    others = [i for i in range(len(ATTRIBUTE_NAMES)) if i not in (SMILING, EYEGLASSES)]
    training_others = {tuple(r) for r in train[:, others].tolist()}
    drawn_others = {tuple(int(v) for v in r) for r in rows[:, others].tolist()}
    assert drawn_others <= training_others  # each row's unnamed attributes are one training image's
    assert len(drawn_others) > 1  # and not the same image for every row
    again = attribute_rows({"Smiling": 1, "Eyeglasses": 0}, tmp_path, 64, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)


def test_a_missing_manifest_says_where_and_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest.parquet is missing.*genflow data prepare.*data.shards"):
        attribute_rows({"Smiling": 1}, tmp_path / "nowhere", 4)
    every = {name: 1 for name in ATTRIBUTE_NAMES}  # all 40 named: no manifest needed
    assert torch.equal(attribute_rows(every, tmp_path / "nowhere", 2), torch.ones(2, len(ATTRIBUTE_NAMES)))
