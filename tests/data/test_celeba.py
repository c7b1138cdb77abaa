import pickle
from multiprocessing import Pool

import numpy as np
import pytest

from genflow.data import celeba as celeba_module
from genflow.data.celeba import ATTRIBUTE_NAMES, open_celeba
from genflow.data.synth import write_sample


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    for layout in ("official", "zip", "kaggle"):
        write_sample(root / layout, n=9, layout=layout, seed=4)
    return root


def test_attribute_names_are_celebas():
    assert len(ATTRIBUTE_NAMES) == 40
    assert ATTRIBUTE_NAMES[:3] == ("5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive")
    assert ATTRIBUTE_NAMES[20] == "Male" and ATTRIBUTE_NAMES[31] == "Smiling" and ATTRIBUTE_NAMES[-1] == "Young"


def test_three_layouts_read_the_same(layouts):
    official = open_celeba(layouts / "official")
    assert official.layout == "official" and official.rejected == [] and not official.missing
    assert official.names == [f"{i:06d}.jpg" for i in range(1, 10)]
    assert official.attrs.shape == (9, 40) and set(np.unique(official.attrs)) <= {-1, 1}
    for path, layout in [
        (layouts / "zip", "zip"),
        (layouts / "zip" / "img_align_celeba.zip", "zip"),
        (layouts / "kaggle", "kaggle"),
    ]:
        other = open_celeba(path)
        assert other.layout == layout, path
        assert other.names == official.names and (other.attrs == official.attrs).all()
        assert other.rejected == []
        assert other.source.read("000007.jpg") == official.source.read("000007.jpg")


def _read_in_worker(args):
    source, name = args
    return source.read(name)


def test_zip_source_reads_in_parallel_processes(layouts):
    celeba = open_celeba(layouts / "zip")
    celeba.source.read("000001.jpg")  # the parent's zip handle must not leak into the workers
    source = pickle.loads(pickle.dumps(celeba.source))
    with Pool(2) as pool:
        read = pool.map(_read_in_worker, [(source, name) for name in celeba.names * 4])
    assert read == [celeba.source.read(name) for name in celeba.names * 4]


def test_not_a_celeba_folder_names_the_expected_files(tmp_path):
    (tmp_path / "stuff.txt").write_text("hi")
    with pytest.raises(FileNotFoundError) as err:
        open_celeba(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "stuff.txt" in message
    for expected in ("list_attr_celeba.txt", "img_align_celeba/", "img_align_celeba.zip", "list_attr_celeba.csv"):
        assert expected in message
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        open_celeba(tmp_path / "absent")


def edit_attr_line(root, line_number, edit):
    path = root / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[line_number - 1] = edit(lines[line_number - 1])
    path.write_text("\n".join(lines) + "\n")


def test_malformed_rows_are_rejected_with_file_and_line(tmp_path):
    write_sample(tmp_path / "s", n=6)
    edit_attr_line(tmp_path / "s", 4, lambda line: line.rsplit(" ", 1)[0])  # 000002: 39 values
    edit_attr_line(tmp_path / "s", 5, lambda line: line[:-2] + " 0")  # 000003: Young is 0
    celeba = open_celeba(tmp_path / "s")
    assert celeba.names == ["000001.jpg", "000004.jpg", "000005.jpg", "000006.jpg"]
    assert [(r.file, r.reason) for r in celeba.rejected] == [
        ("list_attr_celeba.txt:4", "000002.jpg: expected 40 attribute values, got 39"),
        ("list_attr_celeba.txt:5", "000003.jpg: Young is '0', expected -1 or 1"),
    ]
    assert celeba.n_images == 6


def test_malformed_kaggle_row_is_rejected(tmp_path):
    write_sample(tmp_path / "k", n=4, layout="kaggle")
    path = tmp_path / "k" / "list_attr_celeba.csv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace("-1", "no", 1)
    path.write_text("\n".join(lines) + "\n")
    celeba = open_celeba(tmp_path / "k")
    assert len(celeba.names) == 3
    assert celeba.rejected[0].file == "list_attr_celeba.csv:3" and "expected -1 or 1" in celeba.rejected[0].reason


@pytest.mark.parametrize(
    ("line_number", "edit", "message"),
    [
        (1, lambda line: "many", r"list_attr_celeba.txt:1: expected the image count"),
        (1, lambda line: "7", r"list_attr_celeba.txt:1: the count line says 7 images but the file has 6 rows"),
        (2, lambda line: line.replace("Smiling", "Smile"), r"list_attr_celeba.txt:2: header column 32 is 'Smile', expected 'Smiling'"),
        (2, lambda line: line.replace(" Young", ""), r"list_attr_celeba.txt:2: header column 40 is missing, expected 'Young'"),
    ],
)
def test_bad_count_or_header_is_an_error(tmp_path, line_number, edit, message):
    write_sample(tmp_path / "s", n=6)
    edit_attr_line(tmp_path / "s", line_number, edit)
    with pytest.raises(ValueError, match=message):
        open_celeba(tmp_path / "s")


def test_missing_and_unlisted_images_are_rejected(tmp_path):
    write_sample(tmp_path / "s", n=5)
    images = tmp_path / "s" / "img_align_celeba"
    (images / "000002.jpg").unlink()
    (images / "000001.jpg").rename(images / "999999.jpg")
    celeba = open_celeba(tmp_path / "s")
    assert celeba.missing == {"000001.jpg", "000002.jpg"}
    assert len(celeba.names) == 5  # still in the split universe; prepare drops them
    assert [(r.file, r.reason) for r in celeba.rejected] == [
        ("img_align_celeba/000001.jpg", "listed in list_attr_celeba.txt but missing from img_align_celeba"),
        ("img_align_celeba/000002.jpg", "listed in list_attr_celeba.txt but missing from img_align_celeba"),
        ("img_align_celeba/999999.jpg", "not listed in list_attr_celeba.txt"),
    ]
    assert celeba.n_images == 6


def both_parsers(path, csv_format=False):
    fast = celeba_module._parse_attributes_fast(path, csv_format)
    rows = celeba_module._parse_attributes(path, csv_format)
    return fast, rows


def test_fast_and_row_parsers_agree_on_well_formed_files(layouts, tmp_path):
    official = layouts / "official" / "list_attr_celeba.txt"
    kaggle = layouts / "kaggle" / "list_attr_celeba.csv"
    quirky = tmp_path / "list_attr_celeba.txt"  # a BOM, CRLF, tabs and trailing spaces
    lines = official.read_text().splitlines()
    quirky.write_bytes(b"\xef\xbb\xbf" + "\r\n".join([lines[0], lines[1] + " ", *(l.replace(" ", "\t", 1) + "  " for l in lines[2:])]).encode() + b"\r\n")
    for path, csv_format in [(official, False), (kaggle, True), (quirky, False)]:
        fast, rows = both_parsers(path, csv_format)
        assert fast is not None, path
        names, attrs, listed, rejected = fast
        assert names == rows[0] == [f"{i:06d}.jpg" for i in range(1, 10)]
        assert attrs.dtype == rows[1].dtype == np.int8 and (attrs == rows[1]).all() and set(np.unique(attrs)) <= {-1, 1}
        assert listed == rows[2] and rejected == rows[3] == []


@pytest.mark.parametrize(
    "edit",
    [
        lambda line: line.rsplit(" ", 1)[0],  # 39 values
        lambda line: line[:-2] + " 0",  # a value that is not -1 or 1
        lambda line: line[:-2] + " x",  # a value that is not a number
        lambda line: "000001.jpg" + line[10:],  # a name listed twice
        lambda line: "000003 jpg" + line[10:],  # not a file name
    ],
)
def test_the_fast_parser_leaves_malformed_rows_to_the_row_parser(tmp_path, edit):
    write_sample(tmp_path / "s", n=6)
    edit_attr_line(tmp_path / "s", 5, edit)
    fast, rows = both_parsers(tmp_path / "s" / "list_attr_celeba.txt")
    assert fast is None
    assert len(rows[0]) == 5 and len(rows[3]) == 1 and rows[3][0].file == "list_attr_celeba.txt:5"


def test_the_fast_parser_leaves_a_wrong_count_to_the_row_parser(tmp_path):
    write_sample(tmp_path / "s", n=6)
    edit_attr_line(tmp_path / "s", 1, lambda line: "7")
    assert celeba_module._parse_attributes_fast(tmp_path / "s" / "list_attr_celeba.txt", False) is None
