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


def test_sd3_start_step_differs_from_diffusers_where_rounding_splits_them():
    """The reference's own default, 10 steps at denoise 0.8: Stability runs 9 steps (int(10 x 0.2) = 1, as
    10 x (1 - 0.8) is 1.9999...), diffusers' SD 3 img2img 8 (int(10 - 8.0) = 2); minisd follows the reference."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    _, runs = diffusers.StableDiffusion3Img2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sched), 10, 0.8, "cpu")
    assert runs == 8 and 10 - SD3Pipeline.start_step(10, 0.8) == 9


# ------------------------------------------------------------------------------------------ the whole pipelines

PROMPTS = ["a red circle left of a blue square", "a hummingbird over a green hill"]
NEGATIVE = ["blurry, grey", "a yellow star"]


@pytest.fixture
def draws_as_float32(monkeypatch):
    """diffusers draws its noise (and the VAE's posterior sample) in the pipeline's dtype: its float64 twin must draw
    the float32 run's numbers, so that the two differ by float32's rounding alone (the tolerance's floor)."""
    import diffusers.models.autoencoders.vae as vae_module
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as sd
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as sd3
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as sdxl
    from diffusers.utils.torch_utils import randn_tensor

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32, layout=layout).to(dtype)
    for module in (vae_module, sd, sd3, sdxl):
        monkeypatch.setattr(module, "randn_tensor", randn)


def picture(px, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8))


def compare_img2img(cls, theirs, mine, px, denoise, steps, guidance, negative, extra=None, sampler=None, **kw):
    """diffusers' img2img pipeline `cls` on `theirs`'s parts (float32, and its float64 twin for the floor) against
    minisd's pipeline: the same image for each prompt (a list: diffusers' SD 3 img2img encodes image i with
    generator i and does not repeat one image), one generator per image seeded 5 + i, final latents."""
    from tests.conftest import assert_within_floor, float64_twin
    image = [picture(px)] * len(PROMPTS)
    refs = []
    for pipe in (theirs, float64_twin(theirs)):
        ref = cls(**(pipe.components | (extra or {})))
        ref.set_progress_bar_config(disable=True)
        refs.append(ref(PROMPTS, image=image, strength=denoise, num_inference_steps=steps, guidance_scale=guidance,
                        negative_prompt=negative, output_type="latent", **kw,
                        generator=[torch.Generator().manual_seed(5 + i) for i in range(len(PROMPTS))]).images)
    out = mine(PROMPTS, init_image=image, denoise=denoise, steps=steps, guidance=guidance, seed=5,
               negative_prompt=negative or "", return_latents=True, decode=False,
               **({"sampler": sampler} if sampler else {})).latents
    assert_within_floor(refs[0], out, refs[1])
    plain = mine(PROMPTS, steps=steps, guidance=guidance, seed=5, negative_prompt=negative or "", height=px, width=px,
                 return_latents=True, decode=False, **({"sampler": sampler} if sampler else {})).latents
    assert (out - plain).abs().max() > 0.1, "the image made no difference: the test could not see it"
    return out


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from tests.conftest import tiny32
    from tools.bench.generate import random_pipeline, save_folder
    from tests.test_pipeline import diffusers_configs
    cfg = tiny32("sd1")
    cfg.unet.groups = cfg.vae.groups = 16
    tmp = tmp_path_factory.mktemp("img2img-sd1")
    theirs = random_pipeline(*diffusers_configs(cfg), tmp / "vocab", sampler="ddim", seed=11)
    return SimpleNamespace(theirs=theirs, mine=Pipeline.from_checkpoint(save_folder(theirs, tmp / "folder")))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_sd1_equals_stable_diffusion_img2img_pipeline(sd1, draws_as_float32, sampler):
    from tools.bench.generate import sd_scheduler
    compare_img2img(diffusers.StableDiffusionImg2ImgPipeline, sd1.theirs, sd1.mine, 32, 0.6, 10, 7.5, NEGATIVE,
                    extra={"scheduler": sd_scheduler(sampler), "requires_safety_checker": False}, sampler=sampler)


def test_sdxl_equals_stable_diffusion_xl_img2img_pipeline(tmp_path, draws_as_float32):
    from minisd.config import tiny_sdxl
    from tests.test_sdxl import official_xl
    from tools.bench.generate import clip_tokenizer, sd_scheduler
    from tools.parity import save_official
    cfg = tiny_sdxl(image_size=32)
    state, unet, vae, clip, clip2 = official_xl(cfg)
    save_official(tmp_path / "tiny-sdxl.safetensors", state, cfg)
    theirs = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip, text_encoder_2=clip2, tokenizer=clip_tokenizer(tmp_path / "v1", pad_with_eot=True),
        tokenizer_2=clip_tokenizer(tmp_path / "v2", pad_with_eot=False), unet=unet, scheduler=sd_scheduler("ddim"),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    mine = Pipeline.from_checkpoint(tmp_path / "tiny-sdxl.safetensors")
    compare_img2img(diffusers.StableDiffusionXLImg2ImgPipeline, theirs, mine, 32, 0.6, 6, 5.0, None,
                    extra={"add_watermarker": False}, sampler="ddim")


def test_sd3_equals_stable_diffusion_3_img2img_pipeline(tmp_path, draws_as_float32):
    """Euler (diffusers' scheduler), 10 steps at denoise 0.6: both references start at step 4 here."""
    from tests.test_sd3 import build
    sd3 = build(tmp_path, dual=True)
    compare_img2img(diffusers.StableDiffusion3Img2ImgPipeline, sd3.theirs, sd3.mine, 32, 0.6, 10, 5.0, NEGATIVE,
                    sampler="euler", max_sequence_length=77)


# ------------------------------------------------------------------------------------------ steps, batches, errors

@pytest.fixture(scope="module")
def tiny_pipe():
    return Pipeline(build_model(tiny(image_size=32), seed=0).eval())


def test_hooks_count_the_steps_that_run(tiny_pipe):
    """10 steps at denoise 0.5: 5 run, and hooks (the methods' edit steps) and the callback see them as 0..4."""
    class Recorder(AttentionHook):
        def __init__(self):
            self.steps = []

        def begin_step(self, step, cond=slice(None)):
            super().begin_step(step, cond)
            self.steps.append(step)

    rec, seen = Recorder(), []
    tiny_pipe("a red circle", steps=10, guidance=5.0, init_image=picture(32), denoise=0.5, hooks=[rec],
              callback=lambda d: seen.append(d["i"]), decode=False)
    assert rec.steps == seen == [0, 1, 2, 3, 4]


def test_image_i_of_a_batch_equals_its_seed_alone(tiny_pipe):
    kw = dict(steps=6, guidance=5.0, init_image=picture(32), denoise=0.7, decode=False, return_latents=True)
    batch = tiny_pipe("a red circle", n=2, seed=3, **kw).latents
    for i in range(2):
        alone = tiny_pipe("a red circle", seed=3 + i, **kw).latents
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-4 * max(1.0, alone.abs().max().item()), rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 0.1


@pytest.mark.parametrize("kw,says", [
    ({"denoise": 0.0}, r"in \(0, 1\]"),
    ({"denoise": 1.2}, r"in \(0, 1\]"),
    ({"denoise": 0.05}, "runs no step"),
    ({"height": 64}, "keeps the init image's size, 32x32"),
    ({"init_image": picture(36)}, "the init image is 36x36 px; this model needs sides that are multiples of 8"),
    ({"init_image": [picture(32)] * 3}, "3 init images for 1"),
])
def test_bad_image_to_image_is_refused(tiny_pipe, kw, says):
    kw = {"init_image": picture(32), "denoise": 0.5} | kw
    with pytest.raises(ValueError, match=says):
        tiny_pipe("a red circle", steps=10, decode=False, **kw)


def test_denoise_without_an_image_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="give init_image"):
        tiny_pipe("a red circle", steps=2, denoise=0.5, decode=False)


def test_command_line_records_and_counts(tmp_path):
    """The PNG says `Denoising strength`; Attention Regulation's default edit steps are half of the steps that run
    (6 steps at 0.5: 3 run, 2 edited), DenseDiffusion's 30% of them; --edit-steps past the steps that run, a bad
    file and a bad size are refused."""
    from minisd.images import UsageError
    from minisd.sample import build_parser, run
    picture(128).save(tmp_path / "in.png")

    def go(*extra):
        args = build_parser().parse_args(["--prompt", "a red circle and a blue square", "--steps", "6",
                                          "--init-image", str(tmp_path / "in.png"), "--out", str(tmp_path / "out"),
                                          *extra])
        return run(args, log=lambda *a: None)

    [path] = go("--denoise", "0.5", "--regulate")
    text = Image.open(path).text["parameters"]
    assert "Steps: 6," in text and "Denoising strength: 0.5," in text and "Regulation edit steps: 2," in text
    [path] = go("--denoise", "0.5", "--method", "dense", "--layout", "red circle:0,0,0.5,1;blue square:0.5,0,1,1")
    assert "Regulation edit steps: 1," in Image.open(path).text["parameters"]   # 30% of the 3 steps that run
    with pytest.raises(UsageError, match="between 0 and the 3 steps that run of --steps 6"):
        go("--denoise", "0.5", "--regulate", "--edit-steps", "4")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(UsageError, match="is not an image"):
        go("--init-image", str(tmp_path / "bad.png"))
    picture(100).save(tmp_path / "odd.png")
    with pytest.raises(UsageError, match="100x100 px; this model's sides are multiples of 32"):
        go("--init-image", str(tmp_path / "odd.png"))
    with pytest.raises(UsageError, match=r"--denoise is the fraction of the steps that run, in \(0, 1\]"):
        go("--denoise", "0")


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "plms"])
def test_dense_diffusion_reads_the_timesteps_that_run(tiny_pipe, sampler):
    """DenseDiffusion's time decay reads each step's timestep: under image-to-image those of the steps that run
    (10 steps at 0.6: the last 6 of the 10-step schedule), which its hook, told the start, holds; its edit steps
    are the first 30% of the steps that run."""
    from regulation.dense_diffusion import make_dense
    start, seen = Pipeline.start_step(10, 0.6), {}

    def model(x, t, i):
        seen.setdefault(i, t)
        return fake_model(x, t, i)

    SAMPLERS[sampler](model, torch.zeros(1, 4, 2, 2), Schedule(), 10, init=torch.zeros(1, 4, 2, 2), start=start)
    hook = make_dense(tiny_pipe, "a red circle and a blue square", 10 - start,
                      "red circle:0,0,0.5,1;blue square:0.5,0,1,1", sampler=sampler, start=start, height=32, width=32)
    assert hook.timesteps == [seen[i] for i in range(10 - start)] and len(hook.timesteps) == 6
    assert hook.edit_steps == 2
