"""The model protocol's contract, held against every registered family (and two toy GANs here).

Each family, at its tiny config (tests/models/tiny.py): `sample` gives uint8 [n, 3, 64, 64],
the same for the same generator seed; `training_step` returns the losses its optimizers train
(`loss` for one optimizer "main", else `loss/NAME`) and detached scalar metrics; a checkpoint
(genflow/train/checkpoint.py) restores weights, optimisers, schedules, RNG and per-rank training
state; and one optimisation step of the loop (genflow.train.step.optimisation_step, the very
function the Ray worker runs) on 2 gloo DDP ranks equals the same step on one rank with the
combined batch.

The toy GANs below are what the loop must carry besides the VAE: two optimizers trained by
their own losses, and (the alternating variant) steps that leave one optimizer out, which under
DDP needs `find_unused_parameters`. They also run through Ray Train with 2 workers (the default
`train.workers: 2`), where alternation once failed with "Expected to have finished reduction in
the prior iteration".
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
import traceback
from pathlib import Path

import pytest

import genflow.config
import ray.cloudpickle
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from genflow.config import StrictModel, TrainParams
from genflow.models import families
from genflow.models.families import FAMILY_NAMES, get_family
from genflow.models.protocol import Batch, GenerativeModel, adamw
from genflow.train.checkpoint import restore_model, restore_optimizers, restore_rank_state, save_checkpoint
from genflow.train.loop import InMemoryBatches
from genflow.train.step import Optimization, ddp_options, optimisation_step
from tests.models.tiny import TINY_CONFIGS

# Ray workers cannot import this module: the toy families travel to them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --- two toy GANs ---------------------------------------------------------------------------------


class ToyGANConfig(StrictModel):
    latent_dim: int = 8
    hidden: int = 16
    ema_decay: float = 0.9


class ToyGAN(GenerativeModel):
    """A GAN small enough for tests: G maps z to an 8x8 image upsampled to 64x64; D pools to 8x8.

    Non-saturating losses (Goodfellow et al. 2014, Sec. 3): D minimises softplus(-D(x)) +
    softplus(D(G(z))), G minimises softplus(-D(G(z))); both from one forward, each trained by
    its own optimizer. An EMA of G's output layer (after_step) and a per-rank "replay" of the
    last fakes (training_state) exercise the hooks.
    """

    config_class = ToyGANConfig
    image_range = (-1.0, 1.0)
    primary_metric = "d_real"
    monitor = "loss/generator"

    def __init__(self, config: ToyGANConfig):
        super().__init__(config)
        self.generator = nn.Sequential(nn.Linear(config.latent_dim, config.hidden), nn.LeakyReLU(0.2),
                                       nn.Linear(config.hidden, 3 * 8 * 8))
        self.discriminator = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, config.hidden), nn.LeakyReLU(0.2),
                                           nn.Linear(config.hidden, 1))
        self.register_buffer("ema_weight", self.generator[-1].weight.detach().clone())
        self.replay = torch.zeros(0, 3, 64, 64)  # per rank, not a buffer (DDP would broadcast it)

    def optimizers(self, train: TrainParams) -> dict[str, torch.optim.Optimizer]:
        return {"generator": adamw(self.generator.parameters(), train, betas=(0.5, 0.999)),
                "discriminator": adamw(self.discriminator.parameters(), train, betas=(0.5, 0.999))}

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        small = torch.tanh(self.generator(z)).view(-1, 3, 8, 8)
        return F.interpolate(small, scale_factor=8, mode="nearest")

    def critic(self, images: torch.Tensor) -> torch.Tensor:
        return self.discriminator(F.avg_pool2d(images, 8)).squeeze(1)

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        images = batch.images.float()
        fake = self.generate(torch.randn(len(images), self.config.latent_dim, device=images.device))
        self.replay = fake[:2].detach().cpu()
        d_real = self.critic(images)
        losses = {
            "loss/discriminator": F.softplus(-d_real).mean() + F.softplus(self.critic(fake.detach())).mean(),
            "loss/generator": F.softplus(-self.critic(fake)).mean(),
        }
        return {**losses, "d_real": d_real.mean().detach()}

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            self.ema_weight.lerp_(self.generator[-1].weight, 1 - self.config.ema_decay)

    def training_state(self) -> dict:
        return {"replay": self.replay.clone()}

    def load_training_state(self, state: dict) -> None:
        self.replay = state["replay"]

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"d_real": self.critic(batch.images.float()).mean()}

    @torch.no_grad()
    def sample(self, n, cond=None, generator=None):
        self.check_unconditional(cond)
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=self.device())
        return self.to_uint8(self.generate(z))


class AlternatingToyGAN(ToyGAN):
    """The toy GAN stepping D on even steps and G on odd ones: each step leaves one optimizer out."""

    find_unused_parameters = True

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        outputs = super().training_step(batch, step)
        del outputs["loss/generator" if step % 2 == 0 else "loss/discriminator"]
        return outputs


TOY_FAMILIES = {"toy-gan": ToyGAN, "toy-gan-alternating": AlternatingToyGAN}
ALL_FAMILIES = [*FAMILY_NAMES, *TOY_FAMILIES]


def build(name: str, seed: int = 0) -> GenerativeModel:
    """The family at its tiny config, with weights drawn from `seed`."""
    torch.manual_seed(seed)
    if name in TOY_FAMILIES:
        return TOY_FAMILIES[name](ToyGANConfig())
    if name not in TINY_CONFIGS:
        pytest.fail(f"family {name!r} has no tiny config: add it to tests/models/tiny.py TINY_CONFIGS")
    model_class = get_family(name)
    model = model_class(model_class.config_class(**TINY_CONFIGS[name]))
    model.initialize(batch_for(model, 8, seed=99))  # as the loop's setup does on a fresh run
    return model


def batch_for(model: GenerativeModel, n: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    low, high = model.image_range
    # 8-bit pixels k/255 in image_range, as the loader gives them (likelihood families recover k exactly).
    images = low + (high - low) * torch.randint(0, 256, (n, 3, 64, 64), generator=generator) / 255
    return Batch(images, (torch.rand(n, 40, generator=generator) > 0.5).float())


def loss_keys(model: GenerativeModel) -> set[str]:
    return set(Optimization.build(model, TrainParams()).loss_keys.values())


# --- contract checks on one process ---------------------------------------------------------------


def test_every_registered_family_has_a_tiny_config():
    missing = [name for name in FAMILY_NAMES if name not in TINY_CONFIGS]
    assert not missing, f"add tiny configs for {missing} to tests/models/tiny.py TINY_CONFIGS"


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_sample_is_uint8_64px_and_reproducible_from_its_generator_seed(name):
    model = build(name).eval()
    cond = batch_for(model, 3, seed=1).attrs if model.conditional else None
    first = model.sample(3, cond=cond, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global RNG must not matter
    again = model.sample(3, cond=cond, generator=torch.Generator().manual_seed(5))
    assert first.shape == (3, 3, 64, 64) and first.dtype == torch.uint8
    assert torch.equal(first, again)


# Steps within which every optimizer's loss must have appeared: sae's tiny config has five phases
# of one step each (tests/models/tiny.py), then fine-tunes.
CONTRACT_STEPS = 6


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_training_step_returns_its_optimizers_losses_and_detached_scalar_metrics(name):
    model = build(name)
    expected = loss_keys(model)
    assert expected == {"loss"} or all(k.startswith("loss/") for k in expected)
    seen: set[str] = set()
    # A family may leave losses out at a step (the protocol: that optimizer does not step), so each
    # optimizer's loss is looked for over the first steps: alternating GANs show every loss within
    # two, sae (one phase, one optimizer, at a time) within its tiny phases plus a fine-tuning step.
    for step in range(CONTRACT_STEPS):
        if step >= 2 and seen == expected:
            break
        outputs = model.training_step(batch_for(model, 4, seed=step), step)
        losses = {k for k in outputs if k == "loss" or k.startswith("loss/")}
        assert losses and losses <= expected, f"step {step}: losses {sorted(losses)}, optimizers train {sorted(expected)}"
        if losses != expected:
            assert model.find_unused_parameters, "a family leaving a loss out must set find_unused_parameters"
        seen |= losses
        for key, value in outputs.items():
            assert torch.is_tensor(value) and value.ndim == 0, f"{key} is not a scalar tensor"
            assert value.requires_grad == (key in losses), f"{key}: losses carry gradients, metrics are detached"
    assert seen == expected, f"losses {sorted(expected - seen)} never appeared in {CONTRACT_STEPS} steps: their optimizers never step"
    assert model.monitor in expected or model.monitor in outputs


def equal_nested(a, b, where="") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_checkpoint_round_trip_restores_weights_optimizers_rng_and_per_rank_state(name, tmp_path):
    train = TrainParams(max_steps=10, warmup_steps=2)
    model = build(name)
    optimization = Optimization.build(model, train)
    for step in range(2):
        optimisation_step(model, model, optimization, batch_for(model, 4, seed=step), step, grad_clip=1.0)
    save_checkpoint(tmp_path, family=name, model=model, optimizers=optimization.optimizers,
                    schedulers=optimization.schedulers, step=2, rank=0)
    rng = torch.get_rng_state()

    restored = build(name, seed=1)
    restore_model(tmp_path, restored)
    restored_optimization = Optimization.build(restored, train)
    torch.manual_seed(99)
    assert restore_optimizers(tmp_path, restored_optimization.optimizers, restored_optimization.schedulers) == 2
    assert restore_rank_state(tmp_path, restored, rank=0)
    assert not restore_rank_state(tmp_path, restored, rank=1)  # a rank the checkpoint did not have
    equal_nested(model.state_dict(), restored.state_dict(), "state_dict")
    for key in optimization.optimizers:
        equal_nested(optimization.optimizers[key].state_dict(), restored_optimization.optimizers[key].state_dict(), key)
        equal_nested(optimization.schedulers[key].state_dict(), restored_optimization.schedulers[key].state_dict(), key)
    equal_nested(model.training_state(), restored.training_state(), "training_state")
    assert torch.equal(torch.get_rng_state(), rng)
    # The per-rank training state is kept out of the released model.
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(saved["state_dict"]) == set(model.state_dict())


# --- 2 gloo DDP ranks against one rank --------------------------------------------------------------


@contextlib.contextmanager
def constant_noise():
    """torch's random draws as constant fills.

    DDP's claim is about gradients: the ranks' averaged gradients equal the combined batch's. The
    ranks and the single process draw different noise (reparameterisation, GAN z, diffusion t)
    from different streams, so the comparison is made with noise that is the same everywhere.
    """
    patches = {
        "randn": lambda *size, **kw: torch.full(_size(size), 0.3, **_tensor_options(kw)),
        "rand": lambda *size, **kw: torch.full(_size(size), 0.6, **_tensor_options(kw)),
        "randn_like": lambda x, **kw: torch.full_like(x, 0.3, **_tensor_options(kw)),
        "rand_like": lambda x, **kw: torch.full_like(x, 0.6, **_tensor_options(kw)),
        "randint": _constant_randint,
        "randint_like": lambda x, *bounds, **kw: torch.full_like(x, (bounds[-1] - 1) // 2, **_tensor_options(kw)),
        "randperm": lambda n, **kw: torch.arange(n, **_tensor_options(kw)),
        "normal": lambda mean, std, *a, **kw: torch.as_tensor(mean) + 0.3 * torch.as_tensor(std),
        "bernoulli": lambda p, *a, **kw: (p >= 0.5).to(p.dtype),
    }
    methods = {"normal_": 0.3, "uniform_": 0.6, "exponential_": 1.0}
    saved = {name: getattr(torch, name) for name in patches}
    saved_methods = {name: getattr(torch.Tensor, name) for name in methods}
    try:
        for name, patch in patches.items():
            setattr(torch, name, patch)
        for name, value in methods.items():
            setattr(torch.Tensor, name, lambda self, *a, _value=value, **kw: self.fill_(_value))
        yield
    finally:
        for name, original in saved.items():
            setattr(torch, name, original)
        for name, original in saved_methods.items():
            setattr(torch.Tensor, name, original)


def _size(size):
    return tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size


def _tensor_options(kw):
    return {k: v for k, v in kw.items() if k in ("dtype", "device", "layout")}


def _constant_randint(*args, **kw):
    low, high, size = (0, *args[:2]) if len(args) == 2 else args[:3]
    return torch.full(tuple(size), (low + high - 1) // 2, dtype=kw.get("dtype", torch.int64), device=kw.get("device"))


DDP_STEPS = 3  # the second forward is where a missed reduction used to fail
DDP_BATCH = 4  # per rank


def _ddp_rank(rank: int, world_size: int, store: str, out: str) -> None:
    """One spawned gloo rank: every family's DDP steps. Rank 0 first takes the same steps alone
    on the combined batches, before the process group exists (so nothing in them is collective)."""
    torch.set_num_threads(1)
    references = {name: _steps_alone(name, world_size) for name in ALL_FAMILIES} if rank == 0 else {}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    for name in ALL_FAMILIES:
        try:
            model = _steps_on_ranks(name, rank, world_size)
            if rank == 0:
                _compare(model, *references[name]) if isinstance(references[name], tuple) else _fail(references[name])
            results[name] = "ok"
        except Exception:  # noqa: BLE001 (reported per family to the test)
            results[name] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _fail(error: str):
    raise AssertionError(f"the single-process steps failed:\n{error}")


DDP_TRAIN = TrainParams(lr=1e-3)

# Families compared in float64. Their objectives are exact means of per-image terms (in float64 the
# 2 ranks match the combined batch to ~1e-12 relative), but in float32 the gradients differ by up
# to ~5e-4 relative between a batch of 4 and one of 8: each bias gradient sums 8 x 64 x 64
# position terms that largely cancel (pixelcnn's 12,288 sub-pixel log-likelihoods, the ebm's
# Langevin chains through the same convolutions), and the order of that float32 sum depends on
# the batch size. float64 keeps the tolerances below tight enough to catch any batch-level term.
# Under constant_noise the ebm's replay buffers stay equivalent: every chain, on every rank, starts
# from the same constant-filled buffer row (randint's constant), none restarts from noise
# (rand's 0.6 > reinit_rate), and all write back the same chain end to that row.
# The GANs likewise: spectral normalisation divides by a power-iteration estimate, and D's head
# sums over its whole feature map (float32 differences of ~3e-6 on gradients of ~5e-5).
DDP_FLOAT64 = {"pixelcnn", "ebm", "dcgan", "cgan"}


def _ddp_build(name: str) -> GenerativeModel:
    model = build(name)
    return model.double() if name in DDP_FLOAT64 else model


def _batches(model: GenerativeModel, world_size: int) -> list[Batch]:
    dtype = next(model.parameters()).dtype
    batches = [batch_for(model, DDP_BATCH * world_size, seed=10 + step) for step in range(DDP_STEPS)]
    return [Batch(images.to(dtype), attrs.to(dtype)) for images, attrs in batches]


def _steps_alone(name: str, world_size: int):
    try:
        model = _ddp_build(name)
        optimization = Optimization.build(model, DDP_TRAIN)
        with constant_noise():
            for step, combined in enumerate(_batches(model, world_size)):
                optimisation_step(model, model, optimization, combined, step, grad_clip=DDP_TRAIN.grad_clip)
        return model, {key: p.grad for key, p in model.named_parameters()}
    except Exception:  # noqa: BLE001
        return traceback.format_exc()


def _steps_on_ranks(name: str, rank: int, world_size: int) -> GenerativeModel:
    model = _ddp_build(name)
    wrapped = nn.parallel.DistributedDataParallel(model, **ddp_options(model))
    optimization = Optimization.build(model, DDP_TRAIN)
    with constant_noise():
        for step, combined in enumerate(_batches(model, world_size)):
            mine = Batch(*(t[rank * DDP_BATCH:(rank + 1) * DDP_BATCH] for t in combined))
            assert optimisation_step(wrapped, model, optimization, mine, step, grad_clip=DDP_TRAIN.grad_clip).finite
    return model


def _compare(model: GenerativeModel, reference: GenerativeModel, reference_grads: dict) -> None:
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), build(model_name(model)).parameters()))
    assert moved > 1e-4, "the steps did not move the weights: the comparison would mean nothing"
    for key, value in model.named_parameters():
        if reference_grads[key] is not None:
            torch.testing.assert_close(value.grad, reference_grads[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"gradient of {key}: {m}")
    expected_state = reference.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected_state[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def model_name(model: GenerativeModel) -> str:
    return next(name for name in ALL_FAMILIES if type(model) is (TOY_FAMILIES.get(name) or get_family(name)))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[str, str]:
    """Spawned once for every family (each process loops over them): {family: "ok" or the error}."""
    folder = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(_ddp_rank, args=(2, str(folder / "store"), str(folder)), nprocs=2,
                                 join=False, start_method="spawn")
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=240)
        while not context.join(timeout=5):
            if datetime.datetime.now() > deadline:
                pytest.fail("the 2-rank DDP processes did not finish in 240 s (a rank waiting on another?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]
    return {name: "\n".join(dict.fromkeys(r[name] for r in ranks if r[name] != "ok")) or "ok" for name in ALL_FAMILIES}


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_one_step_on_two_ddp_ranks_equals_one_rank_on_the_combined_batch(name, ddp_results):
    assert ddp_results[name] == "ok", ddp_results[name]


# --- the toy GANs through Ray Train, 2 workers ------------------------------------------------------


@pytest.mark.slow
def test_an_alternating_two_optimizer_family_trains_on_two_ray_workers(ray_local, tiny_params, monkeypatch):
    # The alternating GAN is the joint one plus steps that leave an optimizer out: it covers both.
    name = "toy-gan-alternating"
    from genflow.models.saved import load_model
    from genflow.train.trainer import train

    monkeypatch.setitem(families._FAMILIES, name, f"{__name__}:{TOY_FAMILIES[name].__name__}")
    monkeypatch.setitem(genflow.config._family_configs, name, lambda: ToyGANConfig)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(32, 3, 64, 64, generator=generator) * 2 - 1
    attrs = (torch.rand(32, 40, generator=generator) > 0.5).float()
    params = tiny_params("train.workers=2", "train.batch_size=4", "train.max_steps=6", "train.checkpoint_every=3",
                         f"train.run_name={name}")
    result = train(name, params, batch_source=InMemoryBatches(images, attrs, 4), dataset_digest=name)
    assert result.metrics["step"] == 6
    assert torch.isfinite(torch.tensor(result.metrics["loss/generator"]))
    trained = load_model(result.checkpoint_path)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), build(name).state_dict().values()))
