"""A synthetic sample laid out exactly like the CelebA release: the default input of the pipeline.

    genflow data synth data/sample --n 2000 [--layout official|zip|kaggle] [--seed 0]

It is NOT CelebA: each image is a face drawn with PIL whose visible features follow its 40
attributes (hair colour, glasses, smile, hat, beard, lipstick, ...), so that a model trained
on it can be checked to learn, and a conditional model to follow the attributes, in seconds.
Attributes are drawn with roughly CelebA's frequencies and its obvious dependencies (one hair
colour at most, beards on men, no hair on the bald). Same seed, same bytes.
"""

from __future__ import annotations

import csv
import random
import zipfile
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageDraw, ImageFilter

from genflow.data import replaced_atomically
from genflow.data.celeba import ATTR_TXT, ATTRIBUTE_NAMES, IMAGE_SIZE, IMAGES_DIR, IMAGES_ZIP, KAGGLE_IMAGES_DIR

LAYOUTS = ("official", "zip", "kaggle")
LANDMARK_NAMES = (
    "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
).split()
BBOX_NAMES = ["x_1", "y_1", "width", "height"]

# P(attribute) for (women, men), close to CelebA's marginals; the attributes tied to others
# (hair colour and texture, beards, mouth, cheekbones, Young) are drawn in `sample_attributes`.
_P_BY_SEX = {
    "Arched_Eyebrows": (0.40, 0.08),
    "Attractive": (0.68, 0.28),
    "Bags_Under_Eyes": (0.12, 0.33),
    "Bald": (0.002, 0.05),
    "Bangs": (0.22, 0.06),
    "Big_Lips": (0.28, 0.19),
    "Big_Nose": (0.12, 0.40),
    "Blurry": (0.05, 0.05),
    "Bushy_Eyebrows": (0.08, 0.23),
    "Chubby": (0.02, 0.11),
    "Double_Chin": (0.02, 0.09),
    "Eyeglasses": (0.03, 0.11),
    "Heavy_Makeup": (0.65, 0.005),
    "Narrow_Eyes": (0.11, 0.12),
    "Oval_Face": (0.33, 0.22),
    "Pale_Skin": (0.06, 0.02),
    "Pointy_Nose": (0.36, 0.16),
    "Receding_Hairline": (0.05, 0.12),
    "Rosy_Cheeks": (0.11, 0.005),
    "Smiling": (0.52, 0.43),
    "Wearing_Earrings": (0.31, 0.02),
    "Wearing_Hat": (0.04, 0.06),
    "Wearing_Lipstick": (0.78, 0.01),
    "Wearing_Necklace": (0.20, 0.01),
    "Wearing_Necktie": (0.005, 0.17),
}
_P_MALE = 0.42
# One of these hair colours at most; the rest of the mass is "none of the four" (auburn, mixed, ...).
_HAIR_COLOURS = {"Black_Hair": (0.24, 0.25), "Blond_Hair": (0.23, 0.04), "Brown_Hair": (0.21, 0.19), "Gray_Hair": (0.02, 0.07)}
_HAIR_TEXTURES = {"Straight_Hair": (0.18, 0.25), "Wavy_Hair": (0.45, 0.14)}
_P_BEARD_IF_MALE = 0.40
_P_BEARD_KIND = {"5_o_Clock_Shadow": 0.6, "Goatee": 0.38, "Mustache": 0.25, "Sideburns": 0.34}

_HAIR_RGB = {
    "Black_Hair": (30, 24, 22),
    "Blond_Hair": (225, 192, 110),
    "Brown_Hair": (112, 72, 42),
    "Gray_Hair": (168, 168, 172),
}
_OTHER_HAIR_RGB = [(150, 68, 38), (140, 112, 78), (82, 58, 46)]
_SKIN_RGB = [(232, 190, 158), (214, 168, 128), (178, 126, 90), (124, 84, 58), (240, 200, 170)]
_PALE_SKIN_RGB = (244, 226, 216)


def write_sample(out: str | Path, n: int, layout: str = "official", seed: int = 0) -> Path:
    """Write `n` images and the annotation files into the folder `out`, replacing it atomically."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if n < 1:
        raise ValueError(f"--n {n}: write at least one image")
    attrs = sample_attributes(n, np.random.default_rng(seed))
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    landmarks, bboxes = [], []
    out = Path(out)
    with replaced_atomically(out) as tmp:
        with _ImageWriter(tmp, layout) as write_image:
            for i, name in enumerate(names):
                image, marks, bbox = draw_face(dict(zip(ATTRIBUTE_NAMES, attrs[i] > 0)), random.Random(f"{seed}:{i}"))
                write_image(name, simplejpeg.encode_jpeg(np.asarray(image), quality=90, colorsubsampling="420"))
                landmarks.append(marks)
                bboxes.append(bbox)
        rng = np.random.default_rng([seed, 1])
        identities = rng.integers(1, max(2, n // 20) + 1, size=n)
        # The release's partition: the first ~80% train (0), ~10% validation (1), the rest test (2).
        partitions = np.searchsorted([int(0.8 * n), int(0.9 * n)], np.arange(n), side="right")
        tables = {
            "list_attr_celeba": (ATTRIBUTE_NAMES, attrs.tolist()),
            "list_eval_partition": (["partition"], partitions[:, None].tolist()),
            "list_bbox_celeba": (BBOX_NAMES, bboxes),
            "list_landmarks_align_celeba": (LANDMARK_NAMES, landmarks),
        }
        if layout == "kaggle":
            for stem, (columns, rows) in tables.items():
                _write_csv(tmp / f"{stem}.csv", names, columns, rows)
        else:
            _write_release_txt(tmp, names, tables, identities)
    return out


def sample_attributes(n: int, rng: np.random.Generator) -> np.ndarray:
    """int8 [n, 40] of -1/1 in ATTRIBUTE_NAMES order."""

    def u() -> np.ndarray:  # a fresh uniform draw per attribute
        return rng.random(n)

    male = u() < _P_MALE
    on = {name: u() < np.where(male, p_male, p_female) for name, (p_female, p_male) in _P_BY_SEX.items()}
    on["Male"] = male

    bald = on["Bald"]
    on["Receding_Hairline"] &= ~bald
    on["Bangs"] &= ~bald
    on.update(_one_of(_HAIR_COLOURS, male, ~bald, u()))
    on.update(_one_of(_HAIR_TEXTURES, male, ~bald, u()))

    beard = male & (u() < _P_BEARD_IF_MALE)
    on["No_Beard"] = ~beard
    on.update({name: beard & (u() < p) for name, p in _P_BEARD_KIND.items()})

    smiling = on["Smiling"]
    on["Mouth_Slightly_Open"] = u() < np.where(smiling, 0.70, 0.27)
    on["High_Cheekbones"] = u() < np.where(smiling, 0.75, 0.17)
    on["Young"] = u() < np.where(on["Gray_Hair"] | bald, 0.15, 0.82)

    return np.stack([np.where(on[name], 1, -1) for name in ATTRIBUTE_NAMES], axis=1).astype(np.int8)


def _one_of(choices: dict, male: np.ndarray, allowed: np.ndarray, u: np.ndarray) -> dict:
    """Mutually exclusive attributes from one uniform draw: each gets its slice of [0, 1)."""
    result, low = {}, np.zeros_like(u)
    for name, (p_female, p_male) in choices.items():
        high = low + np.where(male, p_male, p_female)
        result[name] = allowed & (low <= u) & (u < high)
        low = high
    return result


def draw_face(a: dict[str, bool], rng: random.Random) -> tuple[Image.Image, list[int], list[int]]:
    """Draw one 178x218 face following the attributes `a`; return it, its landmarks and face box.

    Every attribute but Attractive (no honest picture of it) changes what is drawn.
    """
    face = _Face(a, rng)
    face.clothes()
    face.hair_behind()
    face.head()
    face.eyes()
    face.cheeks_and_nose()
    face.beard()
    face.mouth()
    face.accessories()
    image = face.image.filter(ImageFilter.BoxBlur(2)) if a["Blurry"] else face.image
    return image, [round(v) for v in face.landmarks()], [round(v) for v in face.box()]


class _Face:
    """One face's geometry and colours, jittered; each method draws one part, back to front.

    The geometry follows img_align_celeba: eyes near y=111 and x=69, 108, mouth near y=152.
    """

    def __init__(self, a: dict[str, bool], rng: random.Random):
        self.a, self.rng = a, rng
        background = (rng.uniform(40, 220), rng.uniform(40, 220), rng.uniform(40, 220))
        self.image = Image.new("RGB", IMAGE_SIZE, self.shade(background, 0))
        self.draw = ImageDraw.Draw(self.image)
        self.cx, self.eye_y = 89 + self.jitter(4), 111 + self.jitter(4)
        self.half_w = 40 + self.jitter(3) + (9 if a["Chubby"] else 0) - (5 if a["Oval_Face"] else 0)
        self.top = self.eye_y - 50 + self.jitter(3)
        self.chin = self.eye_y + 58 + self.jitter(3) + (6 if a["Oval_Face"] else 0)
        self.eye_dx = 19.5 + self.jitter(1.5)
        self.nose_y = self.eye_y + 24 + self.jitter(2)
        self.mouth_y, self.mouth_w = self.eye_y + 41 + self.jitter(2), 16 + self.jitter(2)
        self.skin = self.shade(_PALE_SKIN_RGB, 6) if a["Pale_Skin"] else self.shade(rng.choice(_SKIN_RGB))
        hair_name = next((name for name in _HAIR_RGB if a[name]), None)
        self.hair = self.shade(_HAIR_RGB[hair_name] if hair_name else rng.choice(_OTHER_HAIR_RGB), 10)

    def jitter(self, size: float) -> float:
        return self.rng.uniform(-size, size)

    def shade(self, rgb, size: float = 14) -> tuple[int, ...]:
        return tuple(int(min(255, max(0, c + self.jitter(size)))) for c in rgb)

    @staticmethod
    def darker(rgb, factor: float = 0.75) -> tuple[int, ...]:
        return tuple(int(c * factor) for c in rgb)

    @property
    def eye_centres(self) -> list[tuple[float, float]]:
        return [(self.cx - self.eye_dx, self.eye_y), (self.cx + self.eye_dx, self.eye_y)]

    def clothes(self) -> None:
        a, draw, cx, chin = self.a, self.draw, self.cx, self.chin
        draw.ellipse((cx - 85, chin + 18, cx + 85, chin + 140), fill=self.shade((self.rng.uniform(30, 200),) * 3, 40))
        draw.rectangle((cx - 20, chin - 20, cx + 20, chin + 30), fill=self.darker(self.skin, 0.9))  # the neck
        if a["Wearing_Necktie"]:
            tie = [(cx - 7, chin + 22), (cx + 7, chin + 22), (cx + 11, IMAGE_SIZE[1]), (cx - 11, IMAGE_SIZE[1])]
            draw.polygon(tie, fill=self.shade((150, 20, 40), 40))
        if a["Wearing_Necklace"]:
            draw.arc((cx - 22, chin - 5, cx + 22, chin + 28), 20, 160, fill=(235, 205, 90), width=3)

    def hair_behind(self) -> None:
        a, draw, cx, w = self.a, self.draw, self.cx, self.half_w
        if a["Bald"]:
            return
        draw.ellipse((cx - w - 10, self.top - 14, cx + w + 10, self.eye_y + 40), fill=self.hair)
        if a["Male"] and not (a["Wavy_Hair"] or a["Straight_Hair"]):
            return  # short hair
        bottom = self.chin + (0 if a["Male"] else 25)
        if a["Wavy_Hair"]:
            for y in np.arange(self.eye_y - 10, bottom, 12.0):
                for x in (cx - w - 2, cx + w + 2):
                    draw.ellipse((x - 11, y - 8, x + 11, y + 8), fill=self.hair)
        else:
            draw.rectangle((cx - w - 10, self.eye_y - 10, cx + w + 10, bottom), fill=self.hair)

    def head(self) -> None:
        a, draw, cx, w = self.a, self.draw, self.cx, self.half_w
        draw.ellipse((cx - w, self.top, cx + w, self.chin), fill=self.skin)
        if a["Double_Chin"]:
            draw.arc((cx - 22, self.chin - 16, cx + 22, self.chin + 4), 20, 160, fill=self.darker(self.skin), width=3)
        if a["Bald"]:
            return
        # The hair's edge on the forehead; a receding line leaves more forehead.
        hairline = self.top + (12 if a["Receding_Hairline"] else 0)
        draw.chord((cx - w, self.top - 10, cx + w, hairline + 22), 180, 360, fill=self.hair)
        if a["Bangs"]:
            draw.chord((cx - w, self.top - 10, cx + w, self.eye_y - 8), 180, 360, fill=self.hair)

    def eyes(self) -> None:
        a, draw = self.a, self.draw
        brow = self.darker(self.skin, 0.5) if a["Bald"] else self.darker(self.hair, 0.6)
        eye_h = 2 if a["Narrow_Eyes"] else 4
        brow_w = 5 if a["Bushy_Eyebrows"] else 2
        for ex, ey in self.eye_centres:
            if a["Heavy_Makeup"]:
                draw.ellipse((ex - 10, ey - 10, ex + 10, ey + 2), fill=self.shade((120, 80, 150), 30))
            if a["Bags_Under_Eyes"]:
                draw.arc((ex - 8, ey - 2, ex + 8, ey + 9), 20, 160, fill=self.darker(self.skin, 0.7), width=2)
            draw.ellipse((ex - 7, ey - eye_h, ex + 7, ey + eye_h), fill=(245, 245, 240))
            draw.ellipse((ex - 3, ey - min(eye_h, 3), ex + 3, ey + min(eye_h, 3)), fill=self.shade((60, 45, 35), 20))
            if a["Arched_Eyebrows"]:
                draw.arc((ex - 10, ey - 16, ex + 10, ey - 4), 200, 340, fill=brow, width=brow_w)
            else:
                draw.line((ex - 10, ey - 10, ex + 10, ey - 10), fill=brow, width=brow_w)
            if not a["Young"]:  # crow's feet
                outward = 1 if ex > self.cx else -1
                draw.line((ex + 11 * outward, ey - 1, ex + 16 * outward, ey + 2), fill=self.darker(self.skin, 0.7), width=1)

    def cheeks_and_nose(self) -> None:
        a, draw, cx = self.a, self.draw, self.cx
        if a["Rosy_Cheeks"] or a["High_Cheekbones"]:
            cheek = (230, 120, 130) if a["Rosy_Cheeks"] else tuple(min(255, c + 25) for c in self.skin)
            for ex, ey in self.eye_centres:
                draw.ellipse((ex - 8, ey + 11, ex + 8, ey + 21), fill=cheek)
        nose_w = (9 if a["Big_Nose"] else 5) - (2 if a["Pointy_Nose"] else 0)
        nose = [(cx, self.eye_y + 4), (cx - nose_w, self.nose_y), (cx + nose_w, self.nose_y)]
        draw.polygon(nose, fill=self.darker(self.skin, 0.85))

    def beard(self) -> None:
        a, draw, cx, w, eye_y, chin = self.a, self.draw, self.cx, self.half_w, self.eye_y, self.chin
        if a["No_Beard"]:
            return
        beard = (50, 40, 35) if a["Bald"] else self.darker(self.hair, 0.8)
        if a["5_o_Clock_Shadow"]:
            draw.chord((cx - w + 4, eye_y + 10, cx + w - 4, chin), 20, 160, fill=self.darker(self.skin, 0.72))
        if a["Goatee"]:
            draw.ellipse((cx - 10, chin - 16, cx + 10, chin + 2), fill=beard)
        if a["Sideburns"]:
            for x in (cx - w + 5, cx + w - 13):
                draw.rectangle((x, eye_y - 5, x + 8, eye_y + 28), fill=beard)
        if not (a["5_o_Clock_Shadow"] or a["Goatee"] or a["Mustache"] or a["Sideburns"]):
            draw.chord((cx - w, eye_y + 15, cx + w, chin + 4), 0, 180, fill=beard)  # a full beard
        if a["Mustache"]:
            draw.rectangle((cx - self.mouth_w, self.mouth_y - 9, cx + self.mouth_w, self.mouth_y - 4), fill=beard)

    def mouth(self) -> None:
        a, draw, cx, y, w = self.a, self.draw, self.cx, self.mouth_y, self.mouth_w
        lips = self.shade((200, 30, 50), 15) if a["Wearing_Lipstick"] else self.darker(self.skin, 0.7)
        lip_w = 5 if a["Big_Lips"] else 3
        if a["Mouth_Slightly_Open"]:
            draw.ellipse((cx - w + 4, y - 4, cx + w - 4, y + 7), fill=(70, 20, 25))
        if a["Smiling"]:
            draw.arc((cx - w, y - 12, cx + w, y + 8), 15, 165, fill=lips, width=lip_w)
        else:
            draw.line((cx - w, y, cx + w, y), fill=lips, width=lip_w)

    def accessories(self) -> None:
        a, draw, cx, w, eye_y = self.a, self.draw, self.cx, self.half_w, self.eye_y
        if a["Eyeglasses"]:
            frame = self.shade((25, 25, 30), 10)
            lens = frame if self.rng.random() < 0.2 else None  # some are sunglasses
            for ex, ey in self.eye_centres:
                draw.rounded_rectangle((ex - 13, ey - 9, ex + 13, ey + 9), radius=4, outline=frame, fill=lens, width=3)
            draw.line((cx - self.eye_dx + 13, eye_y - 2, cx + self.eye_dx - 13, eye_y - 2), fill=frame, width=3)
        if a["Wearing_Earrings"]:
            for x in (cx - w - 1, cx + w + 1):
                draw.ellipse((x - 4, eye_y + 30, x + 4, eye_y + 38), fill=(235, 205, 90))
        if a["Wearing_Hat"]:
            hat = self.shade((self.rng.uniform(20, 230), self.rng.uniform(20, 230), self.rng.uniform(20, 230)), 0)
            draw.chord((cx - w - 6, self.top - 40, cx + w + 6, eye_y - 4), 180, 360, fill=hat)
            draw.rectangle((cx - w - 18, eye_y - 30, cx + w + 18, eye_y - 20), fill=self.darker(hat))  # the brim

    def landmarks(self) -> list[float]:
        """As list_landmarks_align_celeba: eyes, nose tip, mouth corners (x, y each)."""
        (lx, ly), (rx, ry) = self.eye_centres
        corner_y = self.mouth_y - (3 if self.a["Smiling"] else 0)
        return [lx, ly, rx, ry, self.cx, self.nose_y, self.cx - self.mouth_w, corner_y, self.cx + self.mouth_w, corner_y]

    def box(self) -> list[float]:
        """As list_bbox_celeba: x_1, y_1, width, height of the face."""
        return [self.cx - self.half_w, self.top, 2 * self.half_w, self.chin - self.top]


class _ImageWriter:
    """Context manager giving write(name, jpeg_bytes) for the layout's image location."""

    def __init__(self, root: Path, layout: str):
        self.root, self.layout, self.zip = root, layout, None

    def __enter__(self):
        if self.layout == "zip":
            # JPEGs do not deflate: store them, as fast to read as plain files.
            self.zip = zipfile.ZipFile(self.root / IMAGES_ZIP, "w", zipfile.ZIP_STORED)
            return lambda name, data: self.zip.writestr(zipfile.ZipInfo(f"{IMAGES_DIR}/{name}", (1980, 1, 1, 0, 0, 0)), data)
        folder = self.root / (KAGGLE_IMAGES_DIR if self.layout == "kaggle" else IMAGES_DIR)
        folder.mkdir(parents=True)
        return lambda name, data: (folder / name).write_bytes(data)

    def __exit__(self, *exc):
        if self.zip is not None:
            self.zip.close()


def _write_release_txt(root: Path, names: list[str], tables: dict, identities: np.ndarray) -> None:
    """The release's text files, spaced as the release spaces them."""
    n = len(names)
    attr_columns, attr_rows = tables["list_attr_celeba"]
    lines = [str(n), " ".join(attr_columns) + " "]
    lines += [name + " " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, attr_rows)]
    (root / ATTR_TXT).write_text("\n".join(lines) + "\n")
    _, partition_rows = tables["list_eval_partition"]
    (root / "list_eval_partition.txt").write_text("".join(f"{name} {row[0]}\n" for name, row in zip(names, partition_rows)))
    (root / "identity_CelebA.txt").write_text("".join(f"{name} {i}\n" for name, i in zip(names, identities.tolist())))
    bbox_columns, bbox_rows = tables["list_bbox_celeba"]
    lines = [str(n), " ".join(["image_id", *bbox_columns])]
    lines += [f"{name} {x:5d} {y:3d} {w:3d} {h:3d}" for name, (x, y, w, h) in zip(names, bbox_rows)]
    (root / "list_bbox_celeba.txt").write_text("\n".join(lines) + "\n")
    mark_columns, mark_rows = tables["list_landmarks_align_celeba"]
    lines = [str(n), " ".join(mark_columns)]
    lines += [f"{name:<10}" + "".join(f"{v:5d}" for v in row) for name, row in zip(names, mark_rows)]
    (root / "list_landmarks_align_celeba.txt").write_text("\n".join(lines) + "\n")


def _write_csv(path: Path, names: list[str], columns: list[str], rows: list[list[int]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_id", *columns])
        writer.writerows([name, *row] for name, row in zip(names, rows))
