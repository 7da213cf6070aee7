"""The objectives beyond the paper's (issue "Evidence for Flow-DPO, and the objectives that followed"): MaPO and
Diffusion-SDPO against hand-computed values and the direction of their gradients, in every script; MaPO builds and
runs no reference; one run of each through the real script."""

import gc
import math
from types import SimpleNamespace

import pytest
import torch

import train_diffusion_dpo as sd
import train_diffusion_dpo_flux as flux
import train_diffusion_dpo_sd3 as sd3
import train_diffusion_dpo_sdxl as sdxl
from launch_utils import max_movement, run_in_process, trained_weights

SCRIPTS = (sd, sdxl, sd3, flux)
CPU = SimpleNamespace(device=torch.device("cpu"))


def mapo_score_by_hand(m):
    return 0.5 * m / (math.exp(0.5 * m) - 1)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_mapo_matches_hand_computation_and_its_gradient_lowers_the_winner_and_raises_the_loser(script):
    winners, losers = [0.30, 0.10], [0.32, 0.50]
    errors = torch.tensor(winners + losers, requires_grad=True)
    beta = 0.1
    loss, metrics = script.diffusion_dpo_loss(errors, None, beta, "mapo")
    margins = [1000 * (mapo_score_by_hand(w) - mapo_score_by_hand(l)) for w, l in zip(winners, losers)]
    log_sigmoid = [-math.log1p(math.exp(-z)) for z in margins]
    expected = sum(winners) / 2 - beta * sum(log_sigmoid) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["reward_margin"].item() == pytest.approx(sum(margins) / 2, rel=1e-4)
    assert metrics["margin_acc"].item() == 1.0 and "implicit_acc" not in metrics  # no reference: no DPO accuracy
    loss.backward()
    # descent lowers every winner's error and raises every loser's
    assert (errors.grad[:2] > 0).all() and (errors.grad[2:] < 0).all()
    # the near-tie pair (0.30 vs 0.32, margin ~4.8) is pushed harder than the settled one (margin ~93)
    assert -errors.grad[2] > -errors.grad[3]
    zero = torch.zeros(1, requires_grad=True)
    score = script.mapo_score(zero)
    score.backward()
    assert score.item() == 1.0 and torch.isfinite(zero.grad).all()  # the limit at a zero error, not 0/0


def sdpo_inputs():
    # two pairs of 2-element outputs: the winners' and losers' residuals align (dot product > 0)
    residuals = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
    errors = torch.tensor([0.5, 0.5, 1.0, 2.0], requires_grad=True)
    return residuals, errors


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_sdpo_keeps_the_loss_and_scales_the_losers_gradient_by_its_safeguard(script):
    residuals, errors = sdpo_inputs()
    mu = 0.6
    # by hand: ||g_w||^2 = 2, g_l . g_w = 1 + 2 = 3  =>  lambda = (1 - 0.6) * 2 / 3
    lam = 0.4 * 2 / 3
    guarded = script.sdpo_safeguarded_errors(errors, residuals, mu)
    assert torch.equal(guarded.detach(), errors.detach())  # the values, and so the loss and metrics, are DPO's
    ref = torch.tensor([0.6, 0.4, 0.9, 1.5])
    loss, metrics = script.diffusion_dpo_loss(guarded, ref, 2.0, "sdpo")
    plain, plain_metrics = script.diffusion_dpo_loss(errors, ref, 2.0, "sigmoid")
    assert loss.item() == plain.item() and metrics.keys() == plain_metrics.keys()
    (plain_grad,) = torch.autograd.grad(plain, errors)
    (sdpo_grad,) = torch.autograd.grad(loss, errors)
    assert torch.allclose(sdpo_grad[:2], plain_grad[:2])  # the winners' gradient is untouched
    assert torch.allclose(sdpo_grad[2:], lam * plain_grad[2:])  # the losers' is scaled by lambda
    assert (plain_grad[2:] < 0).all()  # descent still raises the losers' error, only less
    # The safeguard: with the update direction d = -g_w + lambda g_l, the winners' error falls by mu ||g_w||^2.
    g_w, g_l = residuals[:2].flatten(), residuals[2:].flatten()
    assert torch.dot(-g_w + lam * g_l, g_w).item() == pytest.approx(-mu * g_w.pow(2).sum().item())


@pytest.mark.parametrize("script", (sd, sd3), ids=lambda module: module.__name__)
def test_sdpo_leaves_the_losers_gradient_whole_when_it_cannot_raise_the_winners_error(script):
    residuals, errors = sdpo_inputs()
    residuals[2:] *= -1  # the losers' gradient now points away from the winners': g_l . g_w < 0
    guarded = script.sdpo_safeguarded_errors(errors, residuals, 0.6)
    (grad,) = torch.autograd.grad(guarded.sum(), errors)
    assert torch.equal(grad, torch.ones(4))
    # mu = 1: the losers' gradient is switched off wherever they align
    (grad,) = torch.autograd.grad(script.sdpo_safeguarded_errors(errors, sdpo_inputs()[0], 1.0).sum(), errors)
    assert torch.equal(grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def unet_count():
    from diffusers import UNet2DConditionModel

    gc.collect()
    return sum(isinstance(obj, UNet2DConditionModel) for obj in gc.get_objects())


def test_mapo_builds_no_reference_and_runs_no_reference_forward(tiny_sd_path, preference_data_path):
    args = sd.parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", preference_data_path,
                          "--resolution", "64", "--loss_type", "mapo"])
    before = unet_count()
    noise_scheduler, tokenizer, text_encoder, vae, unet, ref_unet = sd.build_models(args, CPU, torch.float32)
    assert ref_unet is None and unet_count() == before + 1  # the policy alone is in memory
    calls = []
    unet.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    batch = sd.collate_pairs([sd.PreferencePairDataset(*sd.load_preference_dataset(args)[:2], tokenizer, args)[0]])
    model_losses, ref_losses = sd.dpo_step_losses(args, batch, (unet, None, vae, text_encoder), noise_scheduler, 0,
                                                  torch.float32)
    assert ref_losses is None and model_losses.shape == (2,) and calls == [2]  # one forward: winner and loser
    dpo = sd.parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", preference_data_path])
    assert sd.build_models(dpo, CPU, torch.float32)[5] is not None  # DPO's frozen copy, for comparison


@pytest.mark.parametrize("loss_type, extra", [("mapo", ["--beta_mapo", "0.1"]), ("sdpo", ["--sdpo_mu", "0.6"])])
def test_each_objective_trains_through_the_script_and_says_so_in_the_card(loss_type, extra, tiny_sd_path,
                                                                           preference_data_path, tmp_path):
    run_in_process(sd, ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", preference_data_path,
                        "--output_dir", tmp_path, "--resolution", "64", "--train_batch_size", "2", "--use_lora",
                        "--learning_rate", "1e-3", "--max_train_steps", "2", "--num_validation_images", "0",
                        "--loss_type", loss_type, *extra])
    assert max_movement(trained_weights(tmp_path)) > 1e-5
    card = (tmp_path / "README.md").read_text()
    assert f"| loss_type | {loss_type} |" in card
    assert ("| beta_mapo | 0.1 |" in card) == (loss_type == "mapo") and ("| sdpo_mu | 0.6 |" in card) == (
        loss_type == "sdpo")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_reference_free_objectives_refuse_reference_errors_and_mu_is_checked(script, preference_data_path, tmp_path,
                                                                           capsys):
    base = ["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path]
    for extra, message in ((["--loss_type", "mapo", "--reference_errors", str(tmp_path)], "has no reference"),
                           (["--loss_type", "sdpo", "--sdpo_mu", "1.5"], "between 0 and 1"),
                           (["--loss_type", "mapo", "--beta_mapo", "0"], "--beta_mapo must be")):
        with pytest.raises(SystemExit):
            script.parse_args(base + extra)
        assert message in capsys.readouterr().err
