import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from genflow.config import Params, TrainParams
from genflow.models.ebm import EBM, EBMConfig
from genflow.models.families import get_family
from genflow.models.protocol import Batch
from genflow.models.saved import load_model, save_model

TINY = {"hidden_channels": (8, 16), "langevin_steps": 5, "buffer_size": 20, "sample_steps": 5}


def tiny_ebm(seed: int = 0, **overrides) -> EBM:
    torch.manual_seed(seed)
    return EBM(EBMConfig(**{**TINY, **overrides}))


def blocky_images(n: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    """Structured images on [-1, 1]: 4×4 blocks of random colour."""
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(coarse, size=size, mode="nearest")


def batch_of(images: torch.Tensor) -> Batch:
    return Batch(images, torch.zeros(images.shape[0], 40))


# --- Langevin dynamics ----------------------------------------------------------------------------


def test_langevin_steps_lower_the_energy_of_a_fixed_network():
    model = tiny_ebm(noise=0.0, step_size=1.0, gradient_clip=1.0)
    start = model.uniform_noise(8, (3, 16, 16), torch.device("cpu"), torch.Generator().manual_seed(0))
    energies = [model.energy(start).detach()]
    x = start
    for _ in range(10):
        x = model.langevin(x, steps=1)
        energies.append(model.energy(x).detach())
    energies = torch.stack(energies)  # [11, 8]
    assert (energies[-1] < energies[0]).all(), energies
    assert (energies[1:] <= energies[:-1] + 1e-6).float().mean() > 0.9  # almost every step descends


def test_langevin_with_noise_still_lowers_the_mean_energy():
    model = tiny_ebm()  # the default step size, noise and clipping
    start = model.uniform_noise(16, (3, 16, 16), torch.device("cpu"), torch.Generator().manual_seed(0))
    end = model.langevin(start, steps=30, generator=torch.Generator().manual_seed(1))
    assert model.energy(end).mean() < model.energy(start).mean()
    assert end.min() >= -1 and end.max() <= 1  # kept in the image range


def test_langevin_step_is_the_sgld_update_by_hand():
    """One step equals x − λ·clip(∇E) + σω, clipped to [-1, 1], with ∇E by autograd."""
    model = tiny_ebm(step_size=2.0, noise=0.1, gradient_clip=0.01)
    x = model.uniform_noise(2, (3, 8, 8), torch.device("cpu"), torch.Generator().manual_seed(0))
    step = model.langevin(x, steps=1, generator=torch.Generator().manual_seed(3))
    x_ = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(model.energy(x_).sum(), x_)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(step, (x - 2.0 * gradient.clamp(-0.01, 0.01) + 0.1 * noise).clamp(-1, 1))


def test_chains_leave_parameter_gradients_untouched_also_under_no_grad():
    model = tiny_ebm()
    model.energy(blocky_images(2)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        samples = model.sample(3, size=16, generator=torch.Generator().manual_seed(0))
        model.evaluate(batch_of(blocky_images(2)))
    assert samples.shape == (3, 3, 16, 16) and samples.dtype == torch.uint8
    for p, grad in zip(model.parameters(), before):
        assert torch.equal(p.grad, grad)


def test_training_step_gradient_is_that_of_the_loss_alone(monkeypatch):
    """The chains add nothing to the parameters' gradients: after training_step none has any, and
    backward of its loss is the gradient of mean[E(x⁺) − E(x̃)] + α·mean[E(x⁺)² + E(x̃)²] at the
    chain ends x̃, computed here by hand."""
    model = tiny_ebm(regularization=0.3)
    chain_ends = []
    langevin = model.langevin
    monkeypatch.setattr(model, "langevin", lambda *args, **kwargs: chain_ends.append(langevin(*args, **kwargs)) or chain_ends[-1])
    real = blocky_images(4)
    out = model(batch_of(real), 0)
    assert all(p.grad is None for p in model.parameters())
    out["loss"].backward()

    (ends,) = chain_ends
    real_energy, sample_energy = model.energy(real), model.energy(ends)
    by_hand = (real_energy - sample_energy).mean() + 0.3 * (real_energy.square() + sample_energy.square()).mean()
    assert out["loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    expected = torch.autograd.grad(by_hand, list(model.parameters()))
    torch.testing.assert_close([p.grad for p in model.parameters()], list(expected), rtol=1e-4, atol=1e-7)
    # The chain ends went back into the buffer (float16).
    distance = (model.replay_buffer.float()[None] - ends[:, None]).abs().amax(dim=(2, 3, 4))  # [ends, rows]
    assert (distance.amin(dim=1) < 1e-3).all()


# --- the replay buffer ----------------------------------------------------------------------------


def test_reinitialisation_rate_is_honoured():
    model = tiny_ebm(reinit_rate=0.2, buffer_size=50)
    model.chain_starts(1, (3, 4, 4), torch.device("cpu"))  # creates the buffer
    model.replay_buffer.fill_(0.5)  # recognisable: noise is never exactly 0.5 everywhere
    starts, rows, fresh = model.chain_starts(20_000, (3, 4, 4), torch.device("cpu"))
    # Binomial(20000, 0.2): standard deviation √(20000·0.2·0.8) ≈ 57 chains.
    assert abs(fresh.sum().item() - 4000) < 5 * math.sqrt(20_000 * 0.2 * 0.8)
    assert (starts[~fresh] == 0.5).all()
    assert not (starts[fresh] == 0.5).all(dim=(1, 2, 3)).any()
    assert rows.min() >= 0 and rows.max() < 50 and len(rows.unique()) == 50


@pytest.mark.parametrize("rate, expected", [(0.0, 0), (1.0, 1000)])
def test_reinitialisation_rate_extremes(rate, expected):
    model = tiny_ebm(reinit_rate=rate)
    _, _, fresh = model.chain_starts(1000, (3, 4, 4), torch.device("cpu"))
    assert fresh.sum().item() == expected


def test_buffers_of_two_ranks_differ_and_both_survive_a_round_trip():
    ranks = []
    for seed in (0, 1):  # the loop seeds rank r with train.seed + r
        model = tiny_ebm(seed=0)  # the same weights on both ranks, as DDP keeps them
        torch.manual_seed(seed)
        model(batch_of(blocky_images(4)), 0)
        ranks.append(model)
    states = [model.training_state() for model in ranks]
    assert not torch.equal(states[0]["replay_buffer"], states[1]["replay_buffer"])
    for state in states:
        restored = tiny_ebm(seed=5)
        assert restored.training_state() == {}
        restored.load_training_state(state)
        assert torch.equal(restored.training_state()["replay_buffer"], state["replay_buffer"])
        torch.manual_seed(7)
        restored(batch_of(blocky_images(4)), 1)  # training continues from the restored buffer


def test_training_state_round_trips_through_torch_save(tmp_path):
    model = tiny_ebm()
    model(batch_of(blocky_images(2)), 0)
    torch.save(model.training_state(), tmp_path / "rank0.pt")
    restored = tiny_ebm()
    restored.load_training_state(torch.load(tmp_path / "rank0.pt", weights_only=True))
    assert torch.equal(restored.replay_buffer, model.replay_buffer)


def test_the_buffer_is_in_no_state_dict_nor_the_released_model(tmp_path):
    model = tiny_ebm()
    model(batch_of(blocky_images(2)), 0)
    assert model.replay_buffer is not None
    assert not any("buffer" in key for key in model.state_dict())
    assert set(dict(model.named_buffers())) == set()  # nothing for DDP to broadcast
    save_model(tmp_path / "model.pt", "ebm", model)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(saved["state_dict"]) == set(model.state_dict())
    loaded = load_model(tmp_path)
    assert loaded.replay_buffer is None
    images = blocky_images(2)
    torch.testing.assert_close(loaded.energy(images), model.energy(images))


@pytest.mark.parametrize(
    "state, match",
    [({"replay": torch.zeros(1)}, "unknown keys"), ({"replay_buffer": torch.zeros(3, 3, 4, 4)}, "buffer_size")],
)
def test_a_wrong_training_state_is_a_clear_error(state, match):
    with pytest.raises(ValueError, match=match):
        tiny_ebm().load_training_state(state)


def test_a_batch_of_another_size_than_the_buffer_is_a_clear_error():
    model = tiny_ebm()
    model(batch_of(blocky_images(2, size=16)), 0)
    with pytest.raises(ValueError, match="data.size"):
        model(batch_of(blocky_images(2, size=8)), 1)


# --- the protocol surface -------------------------------------------------------------------------


def test_family_table_maps_to_this_model():
    assert get_family("ebm") is EBM
    assert EBM.primary_metric == "fd_effnet" and EBM.primary_metric_lower_is_better
    assert EBM.image_range == (-1.0, 1.0)
    assert Params().family_config("ebm") == EBMConfig()


def test_training_step_and_evaluate_return_scalar_float_metrics():
    model = tiny_ebm()
    out = model(batch_of(blocky_images(2)), 0)
    assert set(out) == {"loss", "contrastive_divergence", "energy_real", "energy_sample"}
    metrics = model.evaluate(batch_of(blocky_images(2)))
    assert set(metrics) == {"energy_real", "energy_sample", "energy_gap", "energy_noise"}
    assert metrics["energy_gap"].item() == pytest.approx(metrics["energy_sample"].item() - metrics["energy_real"].item(), abs=1e-6)
    for name, value in [*out.items(), *metrics.items()]:
        assert value.ndim == 0 and value.dtype == torch.float32 and torch.isfinite(value), name
        assert value.requires_grad == (name == "loss"), name


def test_sample_is_reproducible_uint8_and_rejects_attributes():
    model = tiny_ebm()
    first = model.sample(2, size=16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, model.sample(2, size=16, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, model.sample(2, size=16, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, cond=torch.zeros(2, 40))


def test_training_separates_real_images_from_samples():
    """A few CD steps give the real images lower energy than noise."""
    model = tiny_ebm(langevin_steps=3)
    optimizer = model.optimizers(TrainParams(lr=1e-2))["main"]
    real = blocky_images(8, size=8)
    noise = model.uniform_noise(8, (3, 8, 8), torch.device("cpu"))
    gap_before = (model.energy(noise) - model.energy(real)).mean().item()
    for step in range(15):
        loss = model(batch_of(real), step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gap_after = (model.energy(noise) - model.energy(real)).mean().item()
    assert gap_after > gap_before + 0.01, (gap_before, gap_after)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"step_size": 0.0}, "step_size"),
        ({"noise": -1.0}, "noise"),
        ({"reinit_rate": 1.5}, "reinit_rate"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"langevin_steps": 0}, "langevin_steps"),
        ({"gradient_clip": 0.0}, "gradient_clip"),
        ({"hidden_channels": ()}, "hidden_channels"),
        ({"alpha": 0.1}, "alpha"),
    ],
)
def test_config_rejects_bad_keys_and_values(params, field):
    with pytest.raises(ValidationError, match=field):
        EBMConfig(**params)


def _ddp_rank(rank: int, world_size: int, init_file: str, results: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = tiny_ebm(seed=0)  # the same initial weights on both ranks
    torch.manual_seed(100 + rank)  # the loop seeds rank r with train.seed + r
    wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        loss = wrapped(batch_of(blocky_images(2, seed=rank)), step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"state_dict": model.state_dict(), **model.training_state()}, f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


def test_under_ddp_weights_stay_in_sync_while_the_buffers_differ(tmp_path):
    """Two gloo ranks: the chains inside the DDP forward do not upset DDP's one gradient
    all-reduce per step (the weights stay identical), and each rank keeps its own buffer."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ranks[0]["state_dict"]:
        torch.testing.assert_close(ranks[0]["state_dict"][key], ranks[1]["state_dict"][key], rtol=0, atol=1e-6)
    assert not torch.equal(ranks[0]["replay_buffer"], ranks[1]["replay_buffer"])
    assert not torch.equal(ranks[0]["state_dict"]["to_energy.weight"], tiny_ebm(seed=0).state_dict()["to_energy.weight"])
