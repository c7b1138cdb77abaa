"""Fréchet distance, KID and precision/recall against independent computations and toy cases."""

import numpy as np
import pytest
import scipy.linalg
import torch

from genflow.eval.distances import FeatureStats, SavedStats, frechet_distance, kernel_distance, precision_recall


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's formula on np.cov statistics, with scipy's sqrtm of the product Σ1 Σ2."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))


def streamed(x: np.ndarray, batch: int = 37, keep: int = 10_000) -> FeatureStats:
    stats = FeatureStats(x.shape[1], keep=keep)
    for start in range(0, len(x), batch):
        stats.update(torch.from_numpy(x[start : start + batch]).float())
    return stats


def test_streamed_moments_match_numpy():
    x = np.random.default_rng(0).normal(size=(500, 6)) * [1, 2, 3, 1, 1, 5] + 3
    stats = streamed(x)
    np.testing.assert_allclose(stats.mu, x.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(x.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-6, atol=1e-9)


def test_frechet_matches_scipy_on_the_same_features():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    y = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.5
    a, b = streamed(x.astype(np.float32)), streamed(y.astype(np.float32))
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert ours == pytest.approx(scipy_frechet(x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)), rel=1e-6)


def test_frechet_closed_form_for_diagonal_gaussians():
    # For diagonal covariances: |Δμ|² + Σ (σ1 − σ2)² (Dowson & Landau 1982).
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    x = np.random.default_rng(2).normal(size=(20, 64))  # fewer vectors than dimensions: singular Σ
    s = streamed(x)
    assert frechet_distance(s.mu, s.sigma, s.mu, s.sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_grows_monotonically_with_noise():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 8))
    reference = streamed(x)
    distances = []
    for scale in (0.0, 0.25, 0.5, 1.0, 2.0):
        noisy = streamed(x + scale * rng.normal(size=x.shape))
        distances.append(frechet_distance(reference.mu, reference.sigma, noisy.mu, noisy.sigma))
    assert distances[0] == pytest.approx(0.0, abs=1e-9)
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_frechet_refuses_mismatched_statistics():
    with pytest.raises(ValueError, match="different features"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_reservoir_keeps_a_uniform_subset_of_bounded_size():
    x = np.arange(4000, dtype=np.float32)[:, None].repeat(2, 1)
    stats = streamed(x, batch=256, keep=400)
    assert stats.kept.shape == (400, 2) and stats.count == 4000
    kept = stats.kept[:, 0].numpy()
    assert len(np.unique(kept)) == 400
    # A uniform subset of 0..3999: its mean is 1999.5 ± 1155/sqrt(400) ≈ ±58.
    assert abs(kept.mean() - 1999.5) < 4 * 58
    assert (kept >= 2000).mean() == pytest.approx(0.5, abs=0.1)


def test_kid_is_unbiased_for_two_halves_of_one_set():
    rng = np.random.default_rng(4)
    values = []
    for trial in range(20):
        x = torch.from_numpy(rng.normal(size=(200, 10)))
        mean, _ = kernel_distance(x[:100], x[100:], subsets=4, subset_size=100, seed=trial)
        values.append(mean)
    values = np.array(values)
    # The unbiased MMD² estimate scatters around 0 (negative values included); a shift is not.
    assert abs(values.mean()) < 3 * values.std() / np.sqrt(len(values))
    assert (values < 0).any()
    shifted, _ = kernel_distance(x[:100], x[100:] + 0.5, subsets=4, subset_size=100)
    assert shifted > 20 * values.std()


def test_precision_recall_separate_quality_from_diversity():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(10, 2)) * 10
    real = torch.from_numpy(centres[rng.integers(0, 10, 2000)] + rng.normal(size=(2000, 2))).float()
    # Drops 8 of the 10 modes: everything it makes is realistic, but it covers little.
    dropping = torch.from_numpy(centres[rng.integers(0, 2, 2000)] + rng.normal(size=(2000, 2))).float()
    precision, recall = precision_recall(real, dropping, k=3)
    assert precision > 0.9 and recall < 0.35
    # Spreads far too wide: covers every mode, but most of what it makes is off the data.
    wide = torch.from_numpy(rng.normal(size=(2000, 2)) * 25).float()
    precision, recall = precision_recall(real, wide, k=3)
    assert precision < 0.4 and recall > 0.8
    # The same distribution: both high.
    same = torch.from_numpy(centres[rng.integers(0, 10, 2000)] + rng.normal(size=(2000, 2))).float()
    precision, recall = precision_recall(real, same, k=3)
    assert precision > 0.9 and recall > 0.9


def test_saved_stats_round_trip(tmp_path):
    stats = SavedStats.of(streamed(np.random.default_rng(6).normal(size=(50, 4)).astype(np.float32)))
    path = stats.save(tmp_path / "s.npz", with_features=True)
    back = SavedStats.load(path)
    np.testing.assert_array_equal(back.mu, stats.mu)
    assert back.sigma.dtype == np.float64 and back.count == 50 and back.features.shape == (50, 4)
    with np.load(stats.save(tmp_path / "plain.npz")) as plain:
        assert sorted(plain.files) == ["mu", "sigma"]  # what pytorch-fid writes
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="needs arrays 'mu' and 'sigma'"):
        SavedStats.load(tmp_path / "other.npz")


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of uint8 images (reflect padding)."""
    if sigma == 0:
        return images
    taps = torch.arange(-4, 5, dtype=torch.float32)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
    x = torch.nn.functional.pad(images.float(), (4, 4, 4, 4), mode="reflect")
    x = torch.nn.functional.conv2d(x, kernel.view(3, 1, 1, 9), groups=3)
    x = torch.nn.functional.conv2d(x, kernel.view(3, 1, 9, 1), groups=3)
    return x.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def test_frechet_on_image_features_grows_with_blur_and_noise(eval_shards):
    # Image level, through a conv net (the celeba extractor's architecture, seeded): a degraded
    # copy of the test images moves further from them the more it is degraded.
    from genflow.eval.featurizer import AttributeClassifier, preprocess
    from genflow.eval.features import shard_batches

    torch.manual_seed(0)
    network = AttributeClassifier(8).eval()
    images = torch.cat(list(shard_batches(eval_shards, "train", 64)))

    def stats(x):
        s = FeatureStats(network.feature_dim)
        s.update(network.features(preprocess(x)))
        return s

    reference = stats(images)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    for degrade, levels in ((blurred, (0, 0.5, 1, 2, 3)),
                            (lambda x, s: (x.float() + s * noise).round().clamp(0, 255).to(torch.uint8), (0, 5, 10, 20, 40))):
        distances = [frechet_distance(reference.mu, reference.sigma, d.mu, d.sigma)
                     for d in (stats(degrade(images, level)) for level in levels)]
        assert distances[0] == pytest.approx(0.0, abs=1e-9)
        assert all(a < b for a, b in zip(distances, distances[1:])), distances
