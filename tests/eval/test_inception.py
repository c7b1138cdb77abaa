"""The FID Inception network: its layout takes a pytorch-fid weight file key for key; a missing
or wrong file is refused with what to fetch and where (the real file cannot be downloaded here)."""

import pytest
import torch

from genflow.eval.inception import (WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_SHA256_PREFIX, WEIGHTS_URL, FIDInceptionV3,
                                    preprocess, weights_path)

# A few keys and shapes of pt_inception-2015-12-05-6726825d.pth, as pytorch-fid's
# fid_inception_v3 (torchvision's Inception3, 1008 classes, no aux head) names them.
KNOWN_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "fc.weight": (1008, 2048),
}


def test_layout_matches_the_fid_weight_file_and_loads_strictly():
    layout = FIDInceptionV3().state_dict()
    for key, shape in KNOWN_SHAPES.items():
        assert tuple(layout[key].shape) == shape, key
    # 94 conv layers, each conv + batch norm (5 tensors with the step counter), and the fc.
    assert sum(key.endswith(".conv.weight") for key in layout) == 94
    random_weights = {key: torch.randn_like(value.float()).to(value.dtype) for key, value in layout.items()}
    FIDInceptionV3().load_state_dict(random_weights, strict=True)
    # pytorch-fid's file predates BatchNorm's step counter: it must load without those keys too.
    without_counters = {k: v for k, v in random_weights.items() if not k.endswith("num_batches_tracked")}
    FIDInceptionV3().load_state_dict(without_counters, strict=True)


@torch.no_grad()
def test_features_are_the_2048_d_pool():
    network = FIDInceptionV3().eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    x = preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() <= 1
    # The smallest input the strided layers take (75x75) keeps the test fast; 299 works the same way.
    assert network.features(x[:1, :, :75, :75]).shape == (1, 2048)


def test_missing_weights_name_the_file_its_checksum_and_source(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        weights_path("")
    for fact in (WEIGHTS_FILE, WEIGHTS_SHA256_PREFIX, WEIGHTS_URL, WEIGHTS_ENV, "evaluate.inception_weights"):
        assert fact in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        weights_path(str(tmp_path / WEIGHTS_FILE))
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"not the weights")
    monkeypatch.setenv(WEIGHTS_ENV, str(wrong))
    with pytest.raises(ValueError, match=f"does not begin {WEIGHTS_SHA256_PREFIX}"):
        weights_path("")
