"""EfficientNet-Lite0: the packaged ImageNet weights load key for key, and the network works."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from genflow.eval.effnet import EfficientNetLite0, load_effnet, packaged_weights, preprocess

# A photograph shipped with matplotlib (Grace Hopper in uniform) and ImageNet's class for it.
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652


@pytest.fixture(scope="module")
def network():
    return load_effnet()[0]


def test_every_key_of_the_packaged_weights_loads_with_its_shape():
    saved = torch.load(packaged_weights(), map_location="cpu", weights_only=True)
    ours = EfficientNetLite0().state_dict()
    assert set(saved) == set(ours)
    assert all(saved[key].shape == ours[key].shape for key in saved)
    EfficientNetLite0().load_state_dict(saved, strict=True)


@torch.no_grad()
def test_classifies_a_photograph_as_imagenet_does(network):
    # Padding, block order or preprocessing gone wrong shows up as a wrong class first.
    photo = Image.open(PHOTO).convert("RGB").resize((224, 224), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None]
    assert int(network(preprocess(pixels)).argmax()) == MILITARY_UNIFORM


@torch.no_grad()
def test_features_separate_clearly_different_image_sets(network):
    rng = np.random.default_rng(0)

    def smooth_blobs(n, hue):  # coloured blurred noise: one "kind" of image per hue
        base = torch.from_numpy(rng.normal(size=(n, 3, 8, 8))).float()
        images = torch.nn.functional.interpolate(base, size=64, mode="bilinear") * 40 + torch.tensor(hue)[:, None, None]
        return images.clamp(0, 255).to(torch.uint8)

    def mean_features(images):
        return network.features(preprocess(images)).mean(0)

    red, other_red = mean_features(smooth_blobs(6, [200.0, 60.0, 60.0])), mean_features(smooth_blobs(6, [200.0, 60.0, 60.0]))
    blue = mean_features(smooth_blobs(6, [60.0, 60.0, 200.0]))
    within, between = (red - other_red).norm(), (red - blue).norm()
    assert between > 3 * within, (between, within)
