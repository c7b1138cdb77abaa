"""Distances between two sets of image features: Fréchet distance, KID, improved precision/recall.

Features arrive batch by batch (`FeatureStats.update`), so memory does not grow with the number
of images: the Fréchet distance needs only the count, the sum and the sum of outer products
(float64), and KID / precision / recall work on a uniform random subset of at most `keep`
feature vectors (reservoir sampling, seeded), 10,000 by default: KID is defined on subsets
anyway (Bińkowski et al. 2018 use subsets of 1,000), and the k-NN radii of precision/recall are
those of the kept subset, as Kynkäänniemi et al. 2019 compute them on 50k-sample sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torchmetrics.image.kid import poly_mmd

DEFAULT_KEEP = 10_000


@dataclass
class FeatureStats:
    """Running moments of a stream of feature vectors, and a bounded uniform subset of them."""

    dim: int
    keep: int = DEFAULT_KEEP
    seed: int = 0
    count: int = 0
    total: torch.Tensor = field(init=False)
    outer: torch.Tensor = field(init=False)
    kept: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.kept = torch.empty(0, self.dim, dtype=torch.float32)
        self._generator = torch.Generator().manual_seed(self.seed)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch [B, dim] of features."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got {list(features.shape)}")
        batch = features.detach().to("cpu", torch.float64)
        self.total += batch.sum(0)
        self.outer += batch.T @ batch
        self._reservoir(features.detach().to("cpu", torch.float32))
        self.count += len(batch)

    def _reservoir(self, batch: torch.Tensor) -> None:
        # Vitter's Algorithm R: the i-th vector (0-based) replaces a random kept one with
        # probability keep / (i + 1), so the kept set is a uniform sample of everything seen.
        room = self.keep - len(self.kept)
        if room > 0:
            self.kept = torch.cat([self.kept, batch[:room]])
            batch = batch[room:]
        if not len(batch):
            return
        seen = self.count + room + torch.arange(len(batch))  # 0-based positions in the stream
        slots = (torch.rand(len(batch), generator=self._generator, dtype=torch.float64) * (seen + 1)).long()
        accepted = (slots < self.keep).nonzero().flatten().tolist()
        for index in accepted:  # in stream order, so a later vector wins a slot drawn twice
            self.kept[slots[index]] = batch[index]

    @property
    def mu(self) -> np.ndarray:
        self._need(1)
        return (self.total / self.count).numpy()

    @property
    def sigma(self) -> np.ndarray:
        """The unbiased covariance (divided by n - 1), as pytorch-fid's np.cov computes it."""
        self._need(2)
        mean = self.total / self.count
        return ((self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)).numpy()

    def _need(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"{self.count} feature vectors seen; need at least {n}")


@dataclass
class SavedStats:
    """Statistics read back from an .npz: mu, sigma, and features where they were kept."""

    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor | None = None
    count: int | None = None

    @classmethod
    def load(cls, path: str | Path) -> "SavedStats":
        path = Path(path)
        try:
            with np.load(path) as saved:
                if "mu" not in saved or "sigma" not in saved:
                    raise ValueError(f"{path}: not a statistics file (needs arrays 'mu' and 'sigma', has {sorted(saved.files)})")
                features = torch.from_numpy(saved["features"]) if "features" in saved else None
                count = int(saved["count"]) if "count" in saved else None
                return cls(saved["mu"].astype(np.float64), saved["sigma"].astype(np.float64), features, count)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: cannot read as .npz ({err})") from None

    @classmethod
    def of(cls, stats: FeatureStats) -> "SavedStats":
        return cls(stats.mu, stats.sigma, stats.kept, stats.count)

    def save(self, path: str | Path, with_features: bool = False) -> Path:
        """mu and sigma (float64) as pytorch-fid writes them; the kept features and the count on
        request (the real-data cache). Written to a temporary name, then renamed."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: a statistics file name must end in .npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if with_features and self.features is not None:
            arrays.update(features=self.features.numpy(), count=np.int64(self.count))
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez(temporary, **arrays)
        temporary.replace(path)
        return path


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² = |μ1 − μ2|² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) (Fréchet 1957; Dowson & Landau 1982, Eq. 2;
    Heusel et al. 2017, Eq. 6), in float64.

    Tr (Σ1 Σ2)^½ = Tr (Σ1^½ Σ2 Σ1^½)^½: the two products are similar matrices, and the second is
    symmetric positive semi-definite, so its square root is taken from `eigvalsh` (real,
    stable), clamping the round-off negatives; no complex parts to discard as sqrtm of the
    non-symmetric Σ1 Σ2 must.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different features: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    # LAPACK's divide-and-conquer driver: several times faster than the default at d = 1280-2048.
    values, vectors = scipy.linalg.eigh((sigma1 + sigma1.T) / 2, driver="evd")
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(scipy.linalg.eigh((middle + middle.T) / 2, eigvals_only=True, driver="evd").clip(min=0)).sum()
    distance = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)
    return max(distance, 0.0)


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0, device: torch.device | str = "cpu") -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, Eq. 3 with the cubic kernel k(x, y) = (xᵀy / d + 1)³): the
    unbiased MMD² estimate averaged over `subsets` random subsets of `subset_size` (capped at the
    smaller set); returns (mean, standard deviation over subsets). torchmetrics' `poly_mmd` is
    the estimator; the subsets are drawn here with a seed."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(real)} and {len(fake)}")
    generator = torch.Generator().manual_seed(seed)
    real, fake = real.to(device, torch.float64), fake.to(device, torch.float64)
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=generator)[:size].to(device)]
        f = fake[torch.randperm(len(fake), generator=generator)[:size].to(device)]
        values.append(poly_mmd(r, f, degree=3, gamma=None, coef=1.0))
    stacked = torch.stack(values)
    return float(stacked.mean()), float(stacked.std()) if subsets > 1 else 0.0


def _kth_neighbour_radii(features: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance from each vector to its k-th nearest other vector of the same set."""
    if len(features) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors, got {len(features)}")
    radii = []
    for start in range(0, len(features), block):
        distances = torch.cdist(features[start : start + block], features)
        # The k+1 smallest include the vector itself at distance 0.
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _share_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """Share of `points` within radius_i of some centre_i: inside the k-NN manifold estimate."""
    inside = 0
    for start in range(0, len(points), block):
        distances = torch.cdist(points[start : start + block], centres)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, block: int = 1024,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1-3): the real (generated)
    manifold is the union of balls around each real (generated) vector with the radius of its
    k-th nearest neighbour; precision = share of generated vectors inside the real manifold
    (quality), recall = share of real vectors inside the generated manifold (diversity)."""
    real, fake = real.to(device, torch.float32), fake.to(device, torch.float32)
    precision = _share_inside(fake, real, _kth_neighbour_radii(real, k, block), block)
    recall = _share_inside(real, fake, _kth_neighbour_radii(fake, k, block), block)
    return precision, recall
