"""ae, dae, sae: the objective, the corruption, the greedy phases and the code Gaussian that sampling uses."""

import math

import pytest
import torch
import torch.nn.functional as F

import genflow.models.families  # noqa: F401  (the family table: models.* sections are validated)
from genflow.config import ParamsError, TrainParams, load_params
from genflow.models.ae import AE, DAE, SAE, AEConfig, CodeGaussian, DAEConfig, SAEConfig
from genflow.models.protocol import Batch
from tests.models.direct import protocol_step
from tests.models.tiny import TINY_CONFIGS


def tiny(model_class, config_class, family, **overrides):
    torch.manual_seed(0)
    return model_class(config_class(**{**TINY_CONFIGS[family], **overrides}))


def blocky_images(n: int, seed: int = 1) -> torch.Tensor:
    """Images with structure to learn (4×4 blocks of random colour), in [0, 1]."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=64, mode="nearest")


def batch_of(images: torch.Tensor) -> Batch:
    return Batch(images, torch.zeros(len(images), 40))


# --- the objective and the metrics ---------------------------------------------------------------


def test_ae_loss_is_the_mean_squared_error_of_its_reconstruction():
    model = tiny(AE, AEConfig, "ae")
    images = blocky_images(4)
    loss = model.training_step(batch_of(images), 0)["loss"]
    by_hand = ((model.decode(model.encode(images)) - images) ** 2).sum() / images.numel()
    torch.testing.assert_close(loss, by_hand)


def test_evaluate_psnr_is_the_mean_of_per_image_psnr():
    model = tiny(AE, AEConfig, "ae")
    images = blocky_images(3)
    metrics = model.evaluate(batch_of(images))
    errors = ((model.decode(model.encode(images)) - images) ** 2).flatten(1).mean(1)
    assert metrics["reconstruction_psnr"].item() == pytest.approx((10 * torch.log10(1 / errors)).mean().item(), rel=1e-5)
    assert metrics["reconstruction_mse"].item() == pytest.approx(errors.mean().item(), rel=1e-5)
    assert 0 < metrics["reconstruction_ssim"] < 1
    reconstructions = model.reconstruct(images)
    assert reconstructions.dtype == torch.uint8 and reconstructions.shape == images.shape


@pytest.mark.parametrize("kind", ["gaussian", "mask"])
def test_dae_corrupts_the_encoder_input_only_and_targets_the_clean_image(kind, monkeypatch):
    level = 0.3
    model = tiny(DAE, DAEConfig, "dae", corruption=kind, level=level)
    images = blocky_images(8)
    clean = images.clone()
    seen = []
    encode = model.encode

    def recording_encode(x, *args, **kwargs):
        seen.append(x.detach().clone())
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(model, "encode", recording_encode)
    loss = model.training_step(batch_of(images), 0)["loss"]

    assert torch.equal(images, clean), "the batch was corrupted in place"
    corrupted = seen[0]
    difference = corrupted - clean
    if kind == "gaussian":
        assert difference.std().item() == pytest.approx(level, rel=0.05)
        assert difference.mean().abs() < 0.01
    else:
        zeroed = (corrupted == 0) & (clean != 0)
        assert zeroed.float().mean().item() == pytest.approx(level, abs=0.02)
        assert torch.equal(corrupted[~zeroed], clean[~zeroed])  # the rest is untouched
    # The target is the clean image, not the corrupted input.
    reconstructions = model.decode(encode(corrupted))
    torch.testing.assert_close(loss, F.mse_loss(reconstructions, clean))
    assert not torch.allclose(loss, F.mse_loss(reconstructions, corrupted))
    # The codes that sampling fits are the clean images' (the encoder's second input).
    assert torch.equal(seen[1], clean)


def test_dae_evaluate_adds_the_denoising_psnr():
    model = tiny(DAE, DAEConfig, "dae")
    metrics = model.evaluate(batch_of(blocky_images(4)))
    assert {"reconstruction_psnr", "reconstruction_ssim", "reconstruction_mse", "denoising_psnr"} <= set(metrics)


@pytest.mark.parametrize("family", ["ae", "dae", "sae"])
def test_a_few_steps_improve_reconstruction(family):
    model_class, config_class = {"ae": (AE, AEConfig), "dae": (DAE, DAEConfig), "sae": (SAE, SAEConfig)}[family]
    # sae: 5 steps per greedy phase, then fine-tuning.
    model = tiny(model_class, config_class, family, **({"layer_steps": [5] * 5} if family == "sae" else {}))
    optimizers = model.optimizers(TrainParams(lr=3e-3))
    images = blocky_images(16)
    before = model.evaluate(batch_of(images))["reconstruction_psnr"]
    for step in range(60):
        protocol_step(model, optimizers, batch_of(images), step)
    assert model.evaluate(batch_of(images))["reconstruction_psnr"] > before + 2


# --- sae: greedy phases --------------------------------------------------------------------------


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


def test_sae_trains_one_layer_pair_per_phase_and_the_frozen_ones_do_not_change():
    model = tiny(SAE, SAEConfig, "sae", layer_steps=[2, 2, 2, 2, 2])
    optimizers = model.optimizers(TrainParams(lr=1e-2))
    assert list(optimizers) == ["layer1", "layer2", "layer3", "layer4", "layer5", "finetune"]
    batch = batch_of(blocky_images(4))
    pairs = list(zip(model.encoders, model.decoders))
    step = 0
    for phase in range(5):
        before = [(snapshot(e), snapshot(d)) for e, d in pairs]
        for _ in range(2):
            outputs = protocol_step(model, optimizers, batch, step)
            assert [k for k in outputs if k.startswith("loss/")] == [f"loss/layer{phase + 1}"]
            step += 1
        for index, ((encoder, decoder), (encoder_before, decoder_before)) in enumerate(zip(pairs, before)):
            moved = changed(encoder, encoder_before), changed(decoder, decoder_before)
            assert moved == ((True, True) if index == phase else (False, False)), (phase, index, moved)
    before = [(snapshot(e), snapshot(d)) for e, d in pairs]
    outputs = protocol_step(model, optimizers, batch, step)
    assert "loss/finetune" in outputs
    assert all(changed(e, eb) and changed(d, db) for (e, d), (eb, db) in zip(pairs, before))


def test_sae_greedy_loss_reconstructs_the_representation_below_the_pair():
    model = tiny(SAE, SAEConfig, "sae", layer_steps=[1, 1, 1, 1, 1])
    images = blocky_images(2)
    loss = model.training_step(batch_of(images), 2)["loss/layer3"]
    below = model.encoders[1](model.encoders[0](images))
    torch.testing.assert_close(loss, F.mse_loss(model.decoders[2](model.encoders[2](below)), below))


def test_sae_phase_is_a_function_of_the_step_so_a_resumed_run_continues_it():
    model = tiny(SAE, SAEConfig, "sae", layer_steps=[3, 1, 2, 1, 1])
    phases = [model.phase(step) for step in range(10)]
    assert phases == ["layer1"] * 3 + ["layer2"] + ["layer3"] * 2 + ["layer4", "layer5", "finetune", "finetune"]
    # A model rebuilt from its weights (a resume) trains the same phase at the same step.
    resumed = SAE(model.config)
    resumed.load_state_dict(model.state_dict())
    assert "loss/layer3" in resumed.training_step(batch_of(blocky_images(2)), 5)


def test_sae_phase_lengths_are_checked_against_the_pairs_and_max_steps(tmp_path):
    missing = tmp_path / "none.yaml"
    with pytest.raises(ParamsError, match=r"models\.sae\.layer_steps.*one phase per layer pair"):
        load_params(missing, ["models.sae.layer_steps=[10,10]"])
    # Against train.max_steps when sae is configured for a run (not on every command: other
    # families' runs may be shorter than sae's phases).
    short = load_params(missing, ["models.sae.layer_steps=[10,10,10,10,10]", "train.max_steps=50"])
    with pytest.raises(ParamsError, match=r"models\.sae\.layer_steps.*none of train.max_steps 50"):
        short.family_config("sae")
    params = load_params(missing, ["models.sae.layer_steps=[10,10,10,10,10]", "train.max_steps=51"])
    assert params.family_config("sae").layer_steps == (10, 10, 10, 10, 10)


# --- sampling: the Gaussian fitted to the training codes -----------------------------------------


def test_code_gaussian_is_the_debiased_moving_average_of_the_code_moments():
    decay = 0.9
    fit = CodeGaussian(3, decay)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) + 3
               for _ in range(5)]
    for codes in batches:
        fit.observe(codes)
        fit.update()
    # By hand: weights (1 − d)·d^(T−t) over the batches' moments, divided by their sum.
    weights = torch.tensor([(1 - decay) * decay ** (len(batches) - 1 - t) for t in range(len(batches))], dtype=torch.float64)
    means = torch.stack([b.mean(0) for b in batches])
    seconds = torch.stack([b.T @ b / len(b) for b in batches])
    mean = (weights[:, None] * means).sum(0) / weights.sum()
    covariance = (weights[:, None, None] * seconds).sum(0) / weights.sum() - torch.outer(mean, mean)
    fitted_mean, fitted_covariance = fit.fitted()
    torch.testing.assert_close(fitted_mean, mean)
    torch.testing.assert_close(fitted_covariance, covariance)


def test_code_gaussian_samples_follow_the_fit_and_start_as_the_standard_normal():
    fit = CodeGaussian(3, 0.5)
    assert torch.equal(fit.sample(4, torch.Generator().manual_seed(0)), torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    root = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # a singular Σ
    codes = torch.randn(100_000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ root.T + 2
    fit.observe(codes)
    fit.update()
    mean, covariance = fit.fitted()
    drawn = fit.sample(100_000, torch.Generator().manual_seed(2))
    assert (drawn.mean(0) - mean).abs().max() < 5 / math.sqrt(100_000) * 1.5
    torch.testing.assert_close(torch.cov(drawn.T), covariance, atol=0.02, rtol=0)


def test_sample_decodes_codes_from_the_fitted_gaussian_and_is_reproducible():
    model = tiny(AE, AEConfig, "ae")
    images = blocky_images(8)
    model.training_step(batch_of(images), 0)
    model.after_step(1)
    codes = model.encode(images).double()
    torch.testing.assert_close(model.code_fit.fitted()[0], codes.mean(0))
    first = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert first.dtype == torch.uint8 and first.shape == (3, 3, 64, 64)
    assert torch.equal(first, model.sample(3, generator=torch.Generator().manual_seed(0)))
    expected = model.to_uint8(model.decode(model.code_fit.sample(3, torch.Generator().manual_seed(0)).float()))
    assert torch.equal(first, expected)
    # The fit is part of the released model.
    assert {"code_fit.first_moment", "code_fit.second_moment", "code_fit.total_weight"} <= set(model.state_dict())
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, cond=torch.zeros(2, 40))


def _fit_on_rank(rank: int, world_size: int, init_file: str, codes: torch.Tensor, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    fit = CodeGaussian(codes.shape[2], 0.5)
    for step in range(2):
        share = codes[step].chunk(world_size)[rank]
        fit.observe(share)
        fit.update()
    if rank == 0:
        torch.save(fit.state_dict(), out)
    torch.distributed.destroy_process_group()


def test_code_fit_on_two_ranks_equals_one_rank_on_the_combined_batch(tmp_path):
    codes = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    one = CodeGaussian(4, 0.5)
    for step in range(2):
        one.observe(codes[step])
        one.update()
    torch.multiprocessing.spawn(_fit_on_rank, args=(2, str(tmp_path / "init"), codes, str(tmp_path / "two.pt")), nprocs=2)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two[name], value)
