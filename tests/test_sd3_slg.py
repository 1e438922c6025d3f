"""Skip-layer guidance (SLG) for SD 3.5: minisd against Stability's sampler and diffusers' pipeline, on a tiny SD 3.5
file (tests/test_sd3.py builds it and diffusers' references from its official keys).

Stability's SkipLayerCFGDenoiser (sd3_impls.py) and sample_dpmpp_2m are transcribed here line by line around
diffusers' transformer (its own `skip_layers`), diffusers' text states and the reference's sigmas: an
implementation independent of minisd's. diffusers' StableDiffusion3Pipeline(skip_guidance_layers=...) is run as it
is. Where the two differ (guidance 1 or less: diffusers drops SLG with CFG, the reference keeps it), the reference
decides. Tolerances: the references' own float32 noise, measured against their float64 twins (tests/conftest.py).
"""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is the reference")

from minisd.pipeline_sd3 import SLG_MEDIUM, SkipLayerGuidance  # noqa: E402
from tests.conftest import assert_within_floor, float64_twin  # noqa: E402
from tests.test_sd3 import PROMPTS, build, stability_sigmas  # noqa: E402

SLG = SkipLayerGuidance(layers=(1,), scale=2.5, start=0.01, end=0.5)   # the tiny model has joint blocks 0..2


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return build(tmp_path_factory.mktemp("sd3-slg"), dual=True)


class SkipLayerCFGDenoiser:
    """sd3_impls.py's SkipLayerCFGDenoiser, transcribed: `apply_model` gives the denoised latents x - v sigma."""

    def __init__(self, apply_model, steps, skip_layer_config):
        self.model, self.steps = apply_model, steps
        self.slg = skip_layer_config["scale"]
        self.skip_start, self.skip_end = skip_layer_config["start"], skip_layer_config["end"]
        self.skip_layers = skip_layer_config["layers"]
        self.step = 0

    def __call__(self, x, timestep, cond, uncond, cond_scale):
        batched = self.model(torch.cat([x, x]), torch.cat([timestep, timestep]),
                             c_crossattn=torch.cat([cond["c_crossattn"], uncond["c_crossattn"]]),
                             y=torch.cat([cond["y"], uncond["y"]]))
        pos_out, neg_out = batched.chunk(2)
        scaled = neg_out + (pos_out - neg_out) * cond_scale
        if self.slg > 0 and self.step > (self.skip_start * self.steps) and self.step < (self.skip_end * self.steps):
            skip_layer_out = self.model(x, timestep, c_crossattn=cond["c_crossattn"], y=cond["y"],
                                        skip_layers=self.skip_layers)
            scaled = scaled + (pos_out - skip_layer_out) * self.slg
        self.step += 1
        return scaled


def sample_dpmpp_2m(model, x, sigmas, extra_args):
    """sd3_impls.py's sample_dpmpp_2m, transcribed."""
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - old_denoised / (2 * r))
        old_denoised = denoised
    return x


def stability_run(theirs, shift, prompt, steps, cfg_scale, slg, noise, init=None, denoise=1.0):
    """Stability's do_sampling (sd3_infer.py) with SkipLayerCFGDenoiser around diffusers' transformer and text
    encoders (`theirs`, a StableDiffusion3Pipeline): the sigmas cut at int(steps * (1 - denoise)), the latent
    noised by noise_scaling, the denoiser told the full `steps`. Computes in the dtype of `noise`."""
    cond, neg, pooled, neg_pooled = theirs.encode_prompt(prompt, prompt, prompt, negative_prompt="",
                                                         max_sequence_length=77)

    def apply_model(x, sigma, c_crossattn, y, skip_layers=None):
        v = theirs.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=c_crossattn,
                               pooled_projections=y, skip_layers=skip_layers).sample
        return x - v * sigma.view(-1, 1, 1, 1)

    sigmas = stability_sigmas(shift, steps)[int(steps * (1 - denoise)):].to(noise.dtype)
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * (torch.zeros_like(noise) if init is None else init)
    config = {"scale": slg.scale, "start": slg.start, "end": slg.end, "layers": list(slg.layers)}
    extra = {"cond": {"c_crossattn": cond, "y": pooled}, "uncond": {"c_crossattn": neg, "y": neg_pooled},
             "cond_scale": cfg_scale}
    with torch.no_grad():
        return sample_dpmpp_2m(SkipLayerCFGDenoiser(apply_model, steps, config), x, sigmas, extra)


def stability_runs(sd3, *args, init=None, **kw):
    """stability_run in float32 and by the float64 twin of diffusers' parts: (ref, ref64)."""
    return [stability_run(pipe, sd3.cfg.shift, *args[:4], args[4].to(dtype),
                          None if init is None else init.to(dtype), **kw)
            for pipe, dtype in ((sd3.theirs, torch.float32), (float64_twin(sd3.theirs), torch.float64))]


def noise_for(sd3, seed=3):
    side = sd3.cfg.image_size // sd3.cfg.vae.downsample
    return torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_mmdit_skip_layers_match_diffusers(sd3):
    g = torch.Generator().manual_seed(5)
    m = sd3.cfg.mmdit
    x, ctx = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 154, m.context_dim, generator=g)
    pooled, t = torch.randn(2, m.adm_in_channels, generator=g), torch.tensor([900.0, 120.0])
    for skip in ([1], [0, 2]):
        ref, ref64 = (model(hidden_states=x.to(d), timestep=t.to(d), encoder_hidden_states=ctx.to(d),
                            pooled_projections=pooled.to(d), skip_layers=skip).sample
                      for model, d in ((sd3.transformer, torch.float32),
                                       (float64_twin(sd3.transformer), torch.float64)))
        assert_within_floor(ref, sd3.model.mmdit(x, t, y=pooled, context=ctx, skip_layers=skip), ref64)
    full = sd3.model.mmdit(x, t, y=pooled, context=ctx)
    assert (full - ref).abs().max() > 1e-3, "skipping blocks changed nothing: the test could not see it"


@pytest.mark.parametrize("denoise", [1.0, 0.7], ids=["text-to-image", "image-to-image"])
def test_slg_equals_stabilitys_skip_layer_denoiser(sd3, denoise):
    """dpmpp_2m (the reference's sampler) with SLG in steps 1..4 of 10; image-to-image (denoise 0.7: 7 steps run
    from sigma index 3) counts the window over the steps that run, against the full 10, as the reference."""
    steps, scale, noise = 10, 5.0, noise_for(sd3)
    init = None
    if denoise < 1:
        init = torch.randn(noise.shape, generator=torch.Generator().manual_seed(8))
    ref, ref64 = stability_runs(sd3, PROMPTS[0], steps, scale, SLG, noise, init=init, denoise=denoise)
    kw = dict(steps=steps, guidance=scale, sampler="dpmpp_2m", latents=noise.clone(), return_latents=True,
              decode=False)
    if init is not None:   # the image's latents as the reference gets them: hand minisd the same ones
        sd3.mine.encode_images = lambda images, generators: init.clone()
        kw.update(init_image=torch.zeros(1, 3, sd3.cfg.image_size, sd3.cfg.image_size), denoise=denoise)
    try:
        out = sd3.mine(PROMPTS[0], slg=SLG, **kw).latents
        plain = sd3.mine(PROMPTS[0], **kw).latents
    finally:
        sd3.mine.__dict__.pop("encode_images", None)
    assert_within_floor(ref, out, ref64)
    assert (out - plain).abs().max() > 1e-3, "SLG changed nothing: the test could not see it"


def test_slg_equals_diffusers_skip_guidance_layers(sd3):
    """Euler (diffusers' FlowMatchEulerDiscreteScheduler), two prompts, a negative prompt."""
    steps, px = 8, sd3.cfg.image_size
    latents = torch.randn(len(PROMPTS), 16, px // 8, px // 8, generator=torch.Generator().manual_seed(4))
    ref, ref64 = (pipe(PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=steps, guidance_scale=4.0,
                       latents=latents.to(dtype), height=px, width=px, output_type="latent", max_sequence_length=77,
                       skip_guidance_layers=list(SLG.layers), skip_layer_guidance_scale=SLG.scale,
                       skip_layer_guidance_start=SLG.start, skip_layer_guidance_stop=SLG.end).images
                  for pipe, dtype in ((sd3.theirs, torch.float32), (float64_twin(sd3.theirs), torch.float64)))
    out = sd3.mine(PROMPTS, negative_prompt=["blurry", ""], steps=steps, guidance=4.0, sampler="euler",
                   latents=latents.clone(), slg=SLG, return_latents=True, decode=False).latents
    assert_within_floor(ref, out, ref64)


def test_without_cfg_slg_follows_the_reference_not_diffusers(sd3):
    """Guidance 1: the reference's SkipLayerCFGDenoiser still adds the skip-layer term (its CFG at scale 1 is the
    conditional prediction, computed as neg + (pos - neg) * 1 beside the negative half); diffusers' pipeline
    drops SLG with CFG. minisd follows the reference. The tolerance: the same comparison without SLG (the
    reference's neg + (pos - neg) against minisd's conditional pass alone rounds differently in float32)."""
    from dataclasses import replace
    steps, noise = 6, noise_for(sd3, 6)
    kw = dict(steps=steps, guidance=1.0, sampler="dpmpp_2m", latents=noise.clone(), return_latents=True,
              decode=False)
    ref, ref64 = stability_runs(sd3, PROMPTS[1], steps, 1.0, SLG, noise)
    ref_plain, ref_plain64 = stability_runs(sd3, PROMPTS[1], steps, 1.0, replace(SLG, scale=0.0), noise)
    out, plain = sd3.mine(PROMPTS[1], slg=SLG, **kw).latents, sd3.mine(PROMPTS[1], **kw).latents
    scale = max(1.0, ref.abs().max().item())
    floor = max((ref_plain - plain).abs().max().item(), (ref.double() - ref64).abs().max().item()) / scale
    assert (ref - out).abs().max().item() / scale <= 10 * floor
    assert (out - plain).abs().max() > 1e-3 and (ref - ref_plain).abs().max() > 1e-3
    theirs = sd3.theirs(PROMPTS[1], num_inference_steps=steps, guidance_scale=1.0, latents=noise.clone(),
                        output_type="latent", max_sequence_length=77, skip_guidance_layers=list(SLG.layers),
                        skip_layer_guidance_scale=SLG.scale, skip_layer_guidance_start=SLG.start,
                        skip_layer_guidance_stop=SLG.end).images
    without = sd3.theirs(PROMPTS[1], num_inference_steps=steps, guidance_scale=1.0, latents=noise.clone(),
                         output_type="latent", max_sequence_length=77).images
    assert torch.equal(theirs, without), "diffusers now applies SLG without CFG: docs/sd3.md says it does not"


def test_window_and_hooks(sd3):
    """The extra pass runs at the window's steps only (start * steps < i < end * steps), and hooks are told it is
    conditional throughout (rows: all)."""
    from minisd.attention import AttentionHook
    assert [i for i in range(50) if SLG_MEDIUM.active(i, 50)] == list(range(1, 10))   # the reference's 50 steps

    class Recorder(AttentionHook):
        def __init__(self):
            self.begins = []

        def begin_step(self, step, cond=slice(None)):
            super().begin_step(step, cond)
            self.begins.append((step, cond))

    rec = Recorder()
    sd3.mine(PROMPTS[0], steps=6, guidance=5.0, sampler="euler", hooks=[rec], slg=SLG, decode=False)
    assert rec.begins == [(0, slice(1, 2)), (1, slice(1, 2)), (1, slice(None)), (2, slice(1, 2)), (2, slice(None)),
                          (3, slice(1, 2)), (4, slice(1, 2)), (5, slice(1, 2))]


@pytest.mark.parametrize("slg,says", [
    (SkipLayerGuidance(layers=(3,)), r"joint block numbers 0\.\.2 of this model; got 3"),
    (SkipLayerGuidance(layers=()), "got none"),
    (SkipLayerGuidance(layers=(1,), scale=-1.0), "scale must be a finite number >= 0"),
    (SkipLayerGuidance(layers=(1,), start=0.3, end=0.2), "0 <= start < end <= 1"),
    (SkipLayerGuidance(layers=(1,), end=1.5), "0 <= start < end <= 1"),
])
def test_bad_slg_is_refused(sd3, slg, says):
    with pytest.raises(ValueError, match=says):
        sd3.mine(PROMPTS[0], steps=2, slg=slg, decode=False)


def test_command_line(sd3, tmp_path):
    """--slg-layers on a tiny SD 3.5 file: the settings in the PNG, equal to the pipeline's run with them;
    --slg-medium names blocks this file lacks (refused in one line); on a UNet the flags are refused."""
    from PIL import Image

    from minisd.images import UsageError
    from minisd.sample import build_parser, run

    def go(*extra, checkpoint=sd3.path):
        args = build_parser().parse_args(["--prompt", PROMPTS[0], "--checkpoint", str(checkpoint), "--t5-tokenizer",
                                          str(sd3.spiece), "--steps", "6", "--out", str(tmp_path / "out"), *extra])
        return run(args, log=lambda *a: None)

    [path] = go("--slg-layers", "1", "--slg-end", "0.5", "--sampler", "euler")
    text = Image.open(path).text["parameters"]
    assert "SLG scale: 2.5, SLG layers: 1, SLG start: 0.01, SLG end: 0.5," in text
    mine = sd3.mine(PROMPTS[0], steps=6, sampler="euler", slg=SLG)
    assert (np.asarray(Image.open(path)) == np.asarray(mine.images[0])).all()
    with pytest.raises(UsageError, match=r"joint block numbers 0\.\.2 of this model; got 7, 8, 9"):
        go("--slg-medium")
    with pytest.raises(UsageError, match="--slg-scale must be a finite number >= 0"):
        go("--slg-scale", "-1")
    with pytest.raises(UsageError, match=r"--slg-end is a fraction of the steps, in \[0, 1\]"):
        go("--slg-end", "2")
    from minisd.checkpoint import build_model, save_checkpoint
    from minisd.config import tiny
    save_checkpoint(build_model(tiny()), tmp_path / "tiny.safetensors")
    with pytest.raises(UsageError, match="skip-layer guidance over SD 3's joint blocks"):
        args = build_parser().parse_args(["--prompt", "x", "--checkpoint", str(tmp_path / "tiny.safetensors"),
                                          "--slg-scale", "2", "--out", str(tmp_path / "o2")])
        run(args, log=lambda *a: None)


def test_slg_medium_sets_the_reference_guidance(sd3, tmp_path, monkeypatch):
    """--slg-medium brings the setting's guidance 4 unless --guidance says otherwise (the reference's CONFIGS name
    it; its script assigns it to a variable it has already read, so the script runs at 5 unless given --cfg 4)."""
    import minisd.pipeline_sd3 as p
    from minisd.sample import build_parser
    from minisd.generate import prepare
    monkeypatch.setattr(p, "SLG_MEDIUM", SLG)   # the tiny file's blocks, the reference's guidance
    base = ["--prompt", PROMPTS[0], "--checkpoint", str(sd3.path), "--steps", "2", "--slg-medium"]
    job = prepare(build_parser().parse_args(base), sd3.mine, log=lambda *a: None)
    assert job.guidance == p.SLG_MEDIUM_GUIDANCE == 4.0 and job.pipe_options["slg"] == SLG
    job = prepare(build_parser().parse_args(base + ["--guidance", "6"]), sd3.mine, log=lambda *a: None)
    assert job.guidance == 6.0
