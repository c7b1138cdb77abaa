"""Read a CelebA source: the official release (a folder, or its zip), or the Kaggle mirror.

    official: list_attr_celeba.txt  + img_align_celeba/000001.jpg ...
    zip:      list_attr_celeba.txt  + img_align_celeba.zip (members img_align_celeba/000001.jpg ...)
    kaggle:   list_attr_celeba.csv  + img_align_celeba/img_align_celeba/000001.jpg ...

`open_celeba(path)` detects the layout and returns the annotated images with their 40
attributes, plus every row or file it had to reject and why. Image bytes come from an
`ImageSource`, a small picklable description that each worker process opens for itself.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

# The release's order: attribute i of a row is ATTRIBUTE_NAMES[i].
ATTRIBUTE_NAMES = tuple(
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young".split()
)
IMAGE_SIZE = (178, 218)  # (width, height) of every img_align_celeba image

IMAGES_DIR = "img_align_celeba"
IMAGES_ZIP = "img_align_celeba.zip"
KAGGLE_IMAGES_DIR = "img_align_celeba/img_align_celeba"
ATTR_TXT = "list_attr_celeba.txt"
ATTR_CSV = "list_attr_celeba.csv"

_LAYOUTS_HELP = (
    f"  official: {ATTR_TXT} and {IMAGES_DIR}/000001.jpg ...\n"
    f"  zip:      {ATTR_TXT} and {IMAGES_ZIP} (or the zip's own path, annotations beside it)\n"
    f"  kaggle:   {ATTR_CSV} and {KAGGLE_IMAGES_DIR}/000001.jpg ..."
)
# A row's image name becomes the shard key, which webdataset cuts at the first dot.
_IMAGE_NAME = re.compile(r"[^./\\\s]+\.[A-Za-z]+")
_ATTR_VALUES = frozenset({"-1", "1"})


@dataclass(frozen=True)
class Rejection:
    file: str  # relative to the source, e.g. "img_align_celeba/000123.jpg" or "list_attr_celeba.txt:7"
    reason: str


@dataclass
class ImageSource:
    """Where the image files are: a folder, or a zip with its member prefix.

    Picklable and small, so worker processes receive it once; each process opens the zip
    for itself (a zip handle inherited across fork shares one file offset between processes).
    """

    kind: Literal["dir", "zip"]
    path: str
    label: str  # the images' place relative to the source folder, for messages
    prefix: str = ""
    _zip: zipfile.ZipFile | None = field(default=None, repr=False, compare=False)
    _zip_pid: int = field(default=0, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_zip_pid": 0}

    def list_names(self) -> list[str]:
        """The image files present: names directly in the folder (or under the zip prefix)."""
        if self.kind == "dir":
            return [e.name for e in os.scandir(self.path) if e.is_file() and not e.name.startswith(".")]
        members = self._open_zip().namelist()
        names = (m[len(self.prefix) :] for m in members if m.startswith(self.prefix))
        return [n for n in names if n and "/" not in n and not n.startswith(".")]

    def read(self, name: str) -> bytes:
        if self.kind == "dir":
            # Bare system calls: a third of what open().read() costs per small file (~8 vs ~25 us).
            descriptor = os.open(os.path.join(self.path, name), os.O_RDONLY)
            try:
                size = os.fstat(descriptor).st_size
                data = os.read(descriptor, size)
                while len(data) < size and (more := os.read(descriptor, size - len(data))):
                    data += more  # a short read (network file systems): keep reading
                return data
            finally:
                os.close(descriptor)
        return self._open_zip().read(self.prefix + name)

    def describe(self, name: str) -> str:
        """Where a user finds the image, relative to the source folder, for messages and stats."""
        return f"{self.label}/{self.prefix}{name}"

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip


@dataclass
class CelebA:
    """A parsed source: the annotated images, their attributes, and what had to be rejected."""

    root: Path  # the folder holding the annotations
    layout: Literal["official", "zip", "kaggle"]
    source: ImageSource
    attr_file: str  # the attribute file's name, for messages
    names: list[str]  # image file names of the well-formed attribute rows, in file order
    attrs: np.ndarray  # int8 [len(names), 40], CelebA's -1/1
    missing: frozenset[str]  # names listed in attr_file but absent from the images
    rejected: list[Rejection]  # malformed rows, listed-but-missing and unlisted images

    @property
    def n_images(self) -> int:
        """Images the source names: well-formed rows, malformed rows and unlisted files."""
        return len(self.names) + len(self.rejected) - len(self.missing)

    @staticmethod
    def image_id(name: str) -> str:
        """ "000001.jpg" -> "000001", the key of the image in the shards."""
        return name.split(".", 1)[0]


def open_celeba(path: str | Path) -> CelebA:
    """Detect the layout at `path`, parse the attributes and list the images."""
    root, layout, source, attr_file = _detect(Path(path))
    csv_format = attr_file.endswith(".csv")
    parsed = _parse_attributes_fast(root / attr_file, csv_format)
    if parsed is None:  # something is off: the row-by-row parser finds what, and where
        parsed = _parse_attributes(root / attr_file, csv_format)
    names, attrs, listed, rejected = parsed
    on_disk = set(source.list_names())
    missing = frozenset(name for name in names if name not in on_disk)
    for name in sorted(missing):
        rejected.append(Rejection(source.describe(name), f"listed in {attr_file} but missing from {source.label}"))
    for name in sorted(on_disk - listed):
        rejected.append(Rejection(source.describe(name), f"not listed in {attr_file}"))
    return CelebA(root, layout, source, attr_file, names, attrs, missing, rejected)


def _detect(path: Path) -> tuple[Path, str, ImageSource, str]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or folder; set data.source to a CelebA folder or zip, "
            f"or write the synthetic sample with `genflow data synth {path} --n 2000`"
        )
    if path.is_file() and path.suffix == ".zip":
        if not (path.parent / ATTR_TXT).is_file():
            raise FileNotFoundError(f"{path}: expected {ATTR_TXT} beside the zip, in {path.parent}")
        return path.parent, "zip", _zip_source(path), ATTR_TXT
    if path.is_dir():
        if (path / ATTR_CSV).is_file() and (path / KAGGLE_IMAGES_DIR).is_dir():
            return path, "kaggle", ImageSource("dir", str(path / KAGGLE_IMAGES_DIR), KAGGLE_IMAGES_DIR), ATTR_CSV
        if (path / ATTR_TXT).is_file() and (path / IMAGES_DIR).is_dir():
            return path, "official", ImageSource("dir", str(path / IMAGES_DIR), IMAGES_DIR), ATTR_TXT
        if (path / ATTR_TXT).is_file() and (path / IMAGES_ZIP).is_file():
            return path, "zip", _zip_source(path / IMAGES_ZIP), ATTR_TXT
    found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else [path.name]
    raise FileNotFoundError(
        f"{path}: not a CelebA source. Expected one of these layouts:\n{_LAYOUTS_HELP}\n"
        f"found: {', '.join(found) or 'an empty folder'}"
    )


def _zip_source(path: Path) -> ImageSource:
    try:
        with zipfile.ZipFile(path) as archive:
            has_folder = any(m.startswith(IMAGES_DIR + "/") for m in archive.namelist())
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not a readable zip ({err}); download it again") from None
    return ImageSource("zip", str(path), path.name, IMAGES_DIR + "/" if has_folder else "")


_Parsed = tuple[list[str], np.ndarray, set[str], list["Rejection"]]


def _parse_attributes_fast(path: Path, csv_format: bool) -> _Parsed | None:
    """The whole file at C speed (pyarrow), when every row is well formed; None otherwise.

    On a 202,599-row file: ~0.8 s, where the row-by-row parser takes ~5.5 s before any
    image can be decoded. The checks are the row parser's, made on whole columns.
    """
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    header_lines = 1 if csv_format else 2
    head = data.split(b"\n", header_lines)
    if len(head) <= header_lines:
        return None
    try:
        header = [line.decode().split(",") if csv_format else line.decode().split() for line in head[:header_lines]]
    except UnicodeDecodeError:
        return None
    count = None
    if csv_format:
        _check_header(path, 1, [f.strip() for f in header[0]], ["image_id", *ATTRIBUTE_NAMES])
    else:
        count = _read_count(path, header[0])
        _check_header(path, 2, header[1], list(ATTRIBUTE_NAMES))
    body = head[header_lines].replace(b"\r", b"")
    if not csv_format:  # the release pads values to two characters: single spaces for the reader
        body = body.replace(b"\t", b" ")
        while b"  " in body:
            body = body.replace(b"  ", b" ")
        body = body.replace(b" \n", b"\n").replace(b"\n ", b"\n").strip(b" ")
    columns = ["image_id", *ATTRIBUTE_NAMES]
    try:
        table = pa_csv.read_csv(
            pa.py_buffer(body),
            read_options=pa_csv.ReadOptions(column_names=columns),
            parse_options=pa_csv.ParseOptions(delimiter="," if csv_format else " "),
            convert_options=pa_csv.ConvertOptions(column_types={"image_id": pa.string(), **dict.fromkeys(ATTRIBUTE_NAMES, pa.int8())}),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a row with another number of fields, a value not a number
        return None
    names = table.column("image_id")
    attrs = np.stack([table.column(name).to_numpy(zero_copy_only=False) for name in ATTRIBUTE_NAMES], axis=1)
    well_formed = (
        (count is None or count == len(table))
        and not any(column.null_count for column in table.columns)
        and bool(np.all((attrs == 1) | (attrs == -1)))
        and pc.all(pc.match_substring_regex(names, f"^(?:{_IMAGE_NAME.pattern})$")).as_py() in (True, None)
        and len(pc.unique(names)) == len(names)
    )
    if not well_formed:
        return None
    listed = names.to_pylist()
    return listed, attrs, set(listed), []


def _parse_attributes(path: Path, csv_format: bool) -> _Parsed:
    """Well-formed rows' names and attributes (int8 [n, 40]), every name a row lists, rejected rows.

    A wrong header or count line makes the whole file suspect: that is an error. A single
    malformed row only loses its image: it is rejected, counted and listed.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet may add a BOM
        lines = list(csv.reader(f)) if csv_format else [line.split() for line in f]
    if csv_format:  # Kaggle: a header row "image_id,5_o_Clock_Shadow,...", no count line
        count, first_row, expected = None, 1, ["image_id", *ATTRIBUTE_NAMES]
    else:  # the release: the count on line 1, the 40 names on line 2
        count, first_row, expected = _read_count(path, lines[0] if lines else []), 2, list(ATTRIBUTE_NAMES)
    _check_header(path, first_row, lines[first_row - 1] if len(lines) >= first_row else [], expected)

    rows: list[tuple[str, list[str]]] = []
    listed: set[str] = set()
    rejected: list[Rejection] = []
    data_rows = 0
    for line_number, fields in enumerate(lines[first_row:], start=first_row + 1):
        if not fields:
            continue
        data_rows += 1
        name, values = fields[0], fields[1:]
        where = f"{path.name}:{line_number}"
        if not _IMAGE_NAME.fullmatch(name):
            rejected.append(Rejection(where, f"{name!r} is not an image file name like 000001.jpg"))
            continue
        if name in listed:
            rejected.append(Rejection(where, f"{name} is listed a second time"))
            continue
        listed.add(name)
        if len(values) != len(ATTRIBUTE_NAMES):
            rejected.append(Rejection(where, f"{name}: expected {len(ATTRIBUTE_NAMES)} attribute values, got {len(values)}"))
        elif not _ATTR_VALUES.issuperset(values):
            bad = next(i for i, v in enumerate(values) if v not in _ATTR_VALUES)
            rejected.append(Rejection(where, f"{name}: {ATTRIBUTE_NAMES[bad]} is {values[bad]!r}, expected -1 or 1"))
        else:
            rows.append((name, values))
    if count is not None and count != data_rows:
        raise ValueError(
            f"{path}:1: the count line says {count} images but the file has {data_rows} rows; "
            f"the file is truncated or edited, download it again"
        )
    attrs = np.array([[value == "1" for value in values] for _, values in rows], bool).reshape(-1, len(ATTRIBUTE_NAMES))
    return [name for name, _ in rows], np.where(attrs, 1, -1).astype(np.int8), listed, rejected


def _read_count(path: Path, fields: list[str]) -> int:
    if len(fields) != 1 or not fields[0].isdigit():
        raise ValueError(f"{path}:1: expected the image count, got {' '.join(fields)!r}; the file is damaged, download it again")
    return int(fields[0])


def _check_header(path: Path, line_number: int, header: list[str], expected: list[str]) -> None:
    if header == expected:
        return
    column = next(i for i, (got, want) in enumerate(itertools.zip_longest(header, expected)) if got != want)
    got = repr(header[column]) if column < len(header) else "missing"
    want = repr(expected[column]) if column < len(expected) else "the end of the line"
    raise ValueError(
        f"{path}:{line_number}: header column {column + 1} is {got}, expected {want}; "
        f"this is not CelebA's attribute file (it names the 40 attributes in the release's order)"
    )
