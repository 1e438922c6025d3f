"""The samplers against diffusers' schedulers, configured as SD ships them, step by step on the same model outputs."""
import math

import pytest
import torch

from minisd.samplers import SAMPLERS, Schedule, ddim, dpmpp_2m, euler, plms

try:
    from conftest import assert_within_floor
except ImportError:
    from tests.conftest import assert_within_floor

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference these tests compare against")
# diffusers' schedulers trip numpy 2's __array__(copy=...) deprecation; that is theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (2, 4, 8, 8)


class FakeUNet:
    """A fixed nonlinear function of (x, t) plus a fixed random pattern; it logs every call's (t, i).
    Rows are independent (the pattern is shared by all rows), as a real UNet's are."""

    def __init__(self, seed=0):
        self.pattern = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(seed))
        self.calls = []

    def __call__(self, x_in, t, i):
        t = float(t)  # diffusers passes 0-d tensors, we pass floats: compute the same thing from both
        self.calls.append((t, i))
        return 0.8 * x_in + 0.3 * torch.tanh(2 * x_in) * math.cos(t / 300) + 0.2 * (t / 1000) * self.pattern


def reference(name, prediction, spacing):
    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, timestep_spacing=spacing,
              prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[prediction])
    if name == "ddim":
        return diffusers.DDIMScheduler(**kw, set_alpha_to_one=False, clip_sample=False)
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2,
                                                     lower_order_final=True, final_sigmas_type="zero")
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**kw)
    return diffusers.PNDMScheduler(**kw, skip_prk_steps=True, set_alpha_to_one=False)


def run_reference(name, prediction, spacing, steps, model, noise, **step_kw):
    """diffusers' denoising loop; returns the latents after each of our steps."""
    sched = reference(name, prediction, spacing)
    sched.set_timesteps(steps)
    x, after = noise * sched.init_noise_sigma, []
    two_call_start = name == "plms" and steps > 1  # PLMS's first step calls the model twice
    for k, t in enumerate(sched.timesteps):
        i = max(k - 1, 0) if two_call_start else k
        out = model(sched.scale_model_input(x, t), t, i)
        x = sched.step(out, t, x, **step_kw).prev_sample
        if not (two_call_start and k == 0):
            after.append(x)
    return after


def run_ours(name, prediction, spacing, steps, model, noise, **kw):
    after = []
    out = SAMPLERS[name](model, noise, Schedule(prediction=prediction, spacing=spacing), steps,
                         callback=lambda d: after.append(d["x"]), **kw)
    assert len(after) == steps and torch.equal(after[-1], out)
    return after


def assert_steps_close(theirs, ours, theirs64=None):
    """Every step's latents within 10 float32 floors of diffusers' (tests/conftest.py: assert_within_floor)."""
    assert len(ours) == len(theirs)
    assert_within_floor(torch.stack(theirs), torch.stack(ours), None if theirs64 is None else torch.stack(theirs64))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "plms"])
def test_equals_diffusers_step_by_step(name, prediction, spacing):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for steps in (10, 25, 50):
        ours_model, their_model = FakeUNet(), FakeUNet()
        ours = run_ours(name, prediction, spacing, steps, ours_model, noise)
        theirs = run_reference(name, prediction, spacing, steps, their_model, noise)
        assert ours_model.calls == their_model.calls, "the model saw different (t, i) sequences"
        assert_steps_close(theirs, ours, run_reference(name, prediction, spacing, steps, FakeUNet(), noise.double()))


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "plms"])
def test_few_steps_equal_diffusers(name):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for steps in (1, 2, 3, 7):
        ours = run_ours(name, "epsilon", "leading", steps, FakeUNet(), noise)
        theirs = run_reference(name, "epsilon", "leading", steps, FakeUNet(), noise)
        assert_steps_close(theirs, ours, run_reference(name, "epsilon", "leading", steps, FakeUNet(), noise.double()))


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_callback_denoised_equals_diffusers_x0(name, prediction):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    ours, model = [], FakeUNet()
    SAMPLERS[name](model, noise, Schedule(prediction=prediction), 25, callback=lambda d: ours.append(d["denoised"]))

    def denoised(noise):
        sched, model = reference(name, prediction, "leading"), FakeUNet()
        sched.set_timesteps(25)
        x, theirs = noise * sched.init_noise_sigma, []
        for i, t in enumerate(sched.timesteps):
            res = sched.step(model(sched.scale_model_input(x, t), t, i), t, x)
            x = res.prev_sample
            theirs.append(res.pred_original_sample)
        return theirs

    assert_steps_close(denoised(noise), ours, denoised(noise.double()))


@pytest.mark.parametrize("one_generator", [False, True])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_eta_equals_diffusers(prediction, one_generator):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    gens = lambda: (torch.Generator().manual_seed(7) if one_generator
                    else [torch.Generator().manual_seed(10 + r) for r in range(SHAPE[0])])
    for eta in (0.5, 1.0):
        ours = run_ours("ddim", prediction, "leading", 25, FakeUNet(), noise, eta=eta, generator=gens())
        theirs = run_reference("ddim", prediction, "leading", 25, FakeUNet(), noise, eta=eta, generator=gens())
        assert_steps_close(theirs, ours)   # no float64 twin: its random draws would differ
    deterministic = ddim(FakeUNet(), noise, Schedule(prediction=prediction), 25)
    assert (ours[-1] - deterministic).abs().max() > 1e-2, "eta > 0 added no noise"


def test_row_noise_comes_from_its_own_generator():
    noise = torch.randn((3,) + SHAPE[1:], generator=torch.Generator().manual_seed(4))
    seeds = [21, 22, 23]
    sample = lambda x, seeds: ddim(FakeUNet(), x, Schedule(), 10, eta=1.0,
                                   generator=[torch.Generator().manual_seed(s) for s in seeds])
    batch = sample(noise, seeds)
    for r, seed in enumerate(seeds):
        alone = sample(noise[r:r + 1], [seed])
        assert torch.allclose(batch[r:r + 1], alone, atol=1e-6), f"row {r} differs from its generator run alone"
        single = ddim(FakeUNet(), noise[r:r + 1], Schedule(), 10, eta=1.0,
                      generator=torch.Generator().manual_seed(seed))
        assert torch.equal(alone, single), "a list of one generator must act as that generator"
    other = sample(noise, [21, 99, 23])
    assert torch.equal(other[0], batch[0]) and torch.equal(other[2], batch[2])
    assert not torch.allclose(other[1], batch[1], atol=1e-3)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "plms"])
def test_ideal_model_lands_on_the_data(name, prediction):
    """With data = one point x0, the exact eps (or v) is known in closed form, and every sampler must end at x0
    (ddim and plms up to the faint level-0 noise they keep: sqrt(1 - abar_0) ~ 0.03 of the noise)."""
    sched = Schedule(prediction=prediction)
    x0 = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(5))
    noise = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(6))

    def ideal(x_in, t, i):
        a = sched.alphas_cumprod[round(t)].double()  # whole timesteps under leading spacing
        eps = (x_in - a.sqrt() * x0) / (1 - a).sqrt()
        return (eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0).float()

    out = SAMPLERS[name](ideal, noise, sched, 20)
    tol = 0.05 * noise.abs().max().item() if name in ("ddim", "plms") else 1e-3
    assert (out - x0).abs().max().item() < tol


def test_schedule_matches_sd_numbers():
    s = Schedule()
    assert s.timesteps(50)[:2] == [981.0, 961.0] and s.timesteps(50)[-1] == 1.0
    assert Schedule(spacing="trailing").timesteps(50)[0] == 999.0
    assert abs(s.alphas_cumprod[0].item() - 0.99915) < 1e-5 and abs(s.alphas_cumprod[-1].item() - 0.0047) < 1e-4
    assert s.sigma_at(10.5).item() == pytest.approx((s.sigmas[10].item() + s.sigmas[11].item()) / 2, rel=1e-6)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="prediction"):
        Schedule(prediction="v_prediction")
    with pytest.raises(ValueError, match="spacing"):
        Schedule(spacing="karras")
    noise = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="steps"):
        euler(FakeUNet(), noise, Schedule(), 0)
    with pytest.raises(ValueError, match="one per row"):
        ddim(FakeUNet(), noise, Schedule(), 5, eta=1.0, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="model returned"):
        dpmpp_2m(lambda x, t, i: x[:1], noise, Schedule(), 5)
    with pytest.raises(TypeError):
        plms(FakeUNet(), noise, Schedule(), 5, eta=0.5)
