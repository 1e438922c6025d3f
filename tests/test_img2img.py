"""Image-to-image (SDEdit): the image's latents noised to the level of the step the run starts at, then the last steps.

The samplers against diffusers' schedulers started where diffusers' img2img pipelines start them (their own
get_timesteps, set_begin_index, add_noise / scale_noise) and against Stability's reference for SD 3 (its
`sigmas[int(steps * (1 - denoise)):]` and noise_scaling, transcribed); then each family's whole pipeline against
diffusers' img2img pipeline on tiny weights (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline,
StableDiffusion3Img2ImgPipeline), the steps the methods count, and the bad inputs.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers", reason="diffusers' img2img pipelines are the reference")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from minisd.attention import AttentionHook  # noqa: E402
from minisd.checkpoint import build_model  # noqa: E402
from minisd.config import tiny  # noqa: E402
from minisd.pipeline import Pipeline  # noqa: E402
from minisd.pipeline_sd3 import SD3Pipeline  # noqa: E402
from minisd.samplers import FLOW_SAMPLERS, SAMPLERS, FlowSchedule, Schedule  # noqa: E402
from tools.parity import difference  # noqa: E402

TOL = 1e-5
SHAPE = (2, 4, 8, 8)


def assert_close(ref, out, tol=TOL):
    assert ref.shape == out.shape, (ref.shape, out.shape)
    d, rel = difference(ref, out)
    assert rel <= tol, f"max abs difference {d:.3g} is {rel:.3g} of the output scale (tolerance {tol})"


def fake_model(x, t, i):
    """A smooth nonlinear function of (x, t) standing in for the UNet or the MMDiT."""
    t = float(t)
    return 0.8 * x + 0.3 * torch.tanh(2 * x) * math.cos(t / 300) + 0.1 * t / 1000


def scheduler(name):
    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, timestep_spacing="leading")
    if name == "ddim":
        return diffusers.DDIMScheduler(**kw, set_alpha_to_one=False, clip_sample=False)
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2)
    return diffusers.EulerDiscreteScheduler(**kw)


# ------------------------------------------------------------------------------------------------ the samplers

@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler"])
@pytest.mark.parametrize("steps,denoise", [(10, 0.5), (25, 0.73), (7, 1.0), (50, 0.02)])
def test_sampler_starts_where_diffusers_img2img_starts(name, steps, denoise):
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps (its own code) picks the steps; its scheduler
    noises the image there (add_noise) and steps on. minisd's sampler, given the image's latents and the start
    step of Pipeline.start_step, visits the same steps (counted from 0) and gives the same latents."""
    g = torch.Generator().manual_seed(0)
    init, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sched = scheduler(name)
    sched.set_timesteps(steps)
    owner = SimpleNamespace(scheduler=sched)
    timesteps, runs = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(owner, steps, denoise, "cpu")
    x = sched.add_noise(init, noise, timesteps[:1])
    theirs = []
    for t in timesteps:
        x = sched.step(fake_model(sched.scale_model_input(x, t), t, 0), t, x).prev_sample
        theirs.append(x)
    start = Pipeline.start_step(steps, denoise)
    assert steps - start == runs == len(timesteps)
    ours, seen = [], []

    def model(x, t, i):
        seen.append(i)
        return fake_model(x, t, i)

    SAMPLERS[name](model, noise, Schedule(), steps, init=init, start=start, callback=lambda d: ours.append(d["x"]))
    assert seen == list(range(runs))
    for a, b in zip(theirs, ours):
        assert_close(a, b)
    assert len(ours) == runs


def test_plms_starts_afresh_at_the_start_step():
    """PLMS's image-to-image run is its own first steps at the start step's timesteps: the two-call first step,
    then Adams-Bashforth from the history of the steps that run (diffusers' PNDM img2img is not the reference:
    its timestep list repeats one timestep, and slicing it shifts the model's timesteps by one)."""
    g = torch.Generator().manual_seed(1)
    init, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    steps, start, calls = 10, 4, []

    def model(x, t, i):
        calls.append((t, i))
        return fake_model(x, t, i)

    SAMPLERS["plms"](model, noise, Schedule(), steps, init=init, start=start)
    ts = Schedule().timesteps(steps)[start:]
    assert calls == [(ts[0], 0), (ts[1], 0)] + [(t, i) for i, t in enumerate(ts[1:], 1)]


@pytest.mark.parametrize("steps,denoise", [(10, 0.6), (28, 0.35), (4, 1.0)])
def test_flow_euler_starts_where_diffusers_sd3_img2img_starts(steps, denoise):
    g = torch.Generator().manual_seed(2)
    init, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    owner = SimpleNamespace(scheduler=sched)
    timesteps, runs = diffusers.StableDiffusion3Img2ImgPipeline.get_timesteps(owner, steps, denoise, "cpu")
    x = sched.scale_noise(init, timesteps[:1], noise)
    for t in timesteps:
        x = sched.step(fake_model(x, t, 0), t, x).prev_sample
    start = SD3Pipeline.start_step(steps, denoise)
    assert steps - start == runs
    assert_close(x, FLOW_SAMPLERS["euler"](fake_model, noise, FlowSchedule(3.0), steps, init=init, start=start))


def stability_img2img_dpmpp_2m(velocity, init, noise, shift, steps, denoise):
    """Stability's do_sampling (sd3_infer.py) and sample_dpmpp_2m (sd3_impls.py), transcribed: the sigmas cut at
    int(steps * (1 - denoise)), noise_scaling, then DPM-Solver++(2M) on x - sigma v."""
    def sigma_of(t):
        t = t / 1000.0
        return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)
    table = sigma_of(torch.arange(1, 1001, 1))
    sigmas = torch.FloatTensor([sigma_of(t) for t in torch.linspace(table[-1] * 1000, table[0] * 1000, steps)] + [0.0])
    sigmas = sigmas[int(steps * (1 - denoise)):]
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * init
    old = None
    for i in range(len(sigmas) - 1):
        denoised = x - velocity(x, float(sigmas[i] * 1000), i) * sigmas[i]
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - old / (2 * r))
        old = denoised
    return x


@pytest.mark.parametrize("steps,denoise", [(10, 0.6), (50, 0.55), (8, 1.0)])
def test_flow_dpmpp_2m_starts_where_stabilitys_reference_starts(steps, denoise):
    g = torch.Generator().manual_seed(3)
    init, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    ref = stability_img2img_dpmpp_2m(fake_model, init, noise, 3.0, steps, denoise)
    out = FLOW_SAMPLERS["dpmpp_2m"](fake_model, noise, FlowSchedule(3.0), steps, init=init,
                                    start=SD3Pipeline.start_step(steps, denoise))
    assert_close(ref, out, 1e-6)


def test_start_steps_of_the_two_references():
    """SD 1/2/XL: diffusers' rule, the last int(steps * denoise) steps run; SD 3: Stability's, the steps from
    int(steps * (1 - denoise)). Where steps * denoise is not whole they differ: 50 steps at 0.55 run 27 and 28."""
    assert Pipeline.start_step(50, 0.55) == 23 and SD3Pipeline.start_step(50, 0.55) == 22
    assert Pipeline.start_step(50, 0.5) == SD3Pipeline.start_step(50, 0.5) == 25
    assert Pipeline.start_step(4, 1.0) == SD3Pipeline.start_step(4, 1.0) == 0


def test_start_without_an_image_is_refused():
    with pytest.raises(ValueError, match="give init"):
        SAMPLERS["ddim"](fake_model, torch.zeros(SHAPE), Schedule(), 10, start=3)
    with pytest.raises(ValueError, match="step index in 0..9"):
        SAMPLERS["ddim"](fake_model, torch.zeros(SHAPE), Schedule(), 10, init=torch.zeros(SHAPE), start=10)
