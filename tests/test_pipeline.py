"""The whole pipeline, prompt to pixels, equals diffusers' StableDiffusionPipeline on the same tiny random weights.

diffusers writes the folder (save_pretrained of a StableDiffusionPipeline with a CLIPTokenizer over minisd's
vocabulary and SD's scheduler settings) and minisd reads it with `Pipeline.from_checkpoint`: tokenizer, text
encoder, UNet, sampler, guidance and VAE all have to agree for the images to agree. Then the pipeline's own
promises: one seed per image, clear errors, and what attention hooks are told.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers' StableDiffusionPipeline is the reference")

from minisd.attention import AttentionHook  # noqa: E402
from minisd.checkpoint import build_model  # noqa: E402
from minisd.config import tiny  # noqa: E402
from minisd.pipeline import Pipeline  # noqa: E402
from tools.bench.generate import random_pipeline, save_folder, sd_scheduler  # noqa: E402
from tools.parity import diffusers_unet_config  # noqa: E402

try:
    from conftest import assert_within_floor, float32_floor, float64_twin
except ImportError:
    from tests.conftest import assert_within_floor, float32_floor, float64_twin

PX, STEPS = 32, 4
PROMPTS = ["a red circle left of a blue square", "a hummingbird over a green hill"]
NEGATIVE = ["blurry, grey", "a yellow star"]


def diffusers_configs(cfg):
    """diffusers/transformers configs for a minisd ModelConfig (the same sizes, in their vocabulary)."""
    v, t = cfg.vae, cfg.text
    vae = dict(in_channels=v.in_channels, out_channels=v.out_ch, latent_channels=v.z_channels,
               block_out_channels=[v.ch * m for m in v.ch_mult], layers_per_block=v.num_res_blocks,
               down_block_types=["DownEncoderBlock2D"] * len(v.ch_mult),
               up_block_types=["UpDecoderBlock2D"] * len(v.ch_mult), norm_num_groups=v.groups,
               sample_size=cfg.image_size, scaling_factor=v.scale_factor)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                hidden_act=t.hidden_act, max_position_embeddings=t.max_position_embeddings)
    return diffusers_unet_config(cfg.unet), vae, text


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tmp_path_factory, make_tiny32):
    """SD 1 layout: head count, 1x1 conv projections, quick_gelu, padding with end-of-text. SD 2 layout: fixed
    head width (a per-level list of head counts in diffusers), Linear projections, gelu, padding with "!"."""
    layout = request.param
    cfg = make_tiny32(layout)
    cfg.unet.groups = cfg.vae.groups = 16
    tmp = tmp_path_factory.mktemp(f"pipeline-{layout}")
    theirs = random_pipeline(*diffusers_configs(cfg), tmp / "vocab", pad_with_eot=layout == "sd1",
                             sampler="ddim", seed=11)
    folder = save_folder(theirs, tmp / "folder")
    mine = Pipeline.from_checkpoint(folder)
    return SimpleNamespace(layout=layout, theirs=theirs, mine=mine, cfg=cfg)


def test_folder_is_read_as_its_layout(pair):
    cfg, u = pair.mine.cfg, pair.mine.cfg.unet
    assert cfg.text.pad_with_eot == (pair.layout == "sd1") and pair.mine.tokenizer.pad_with_eot == cfg.text.pad_with_eot
    assert u.use_linear_in_transformer == (pair.layout == "sd2")
    assert (u.num_head_channels == -1) == (pair.layout == "sd1")
    assert cfg.text.hidden_act == ("quick_gelu" if pair.layout == "sd1" else "gelu")
    ref = pair.theirs.tokenizer(PROMPTS + NEGATIVE, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
    assert torch.equal(pair.mine.tokenizer(PROMPTS + NEGATIVE), ref)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_images_equal_diffusers(pair, sampler, guidance):
    """Two prompts with their negative prompts, the same starting latents: the same final latents and images."""
    side = PX // pair.cfg.vae.downsample
    latents = torch.randn(len(PROMPTS), 4, side, side, generator=torch.Generator().manual_seed(3))

    def reference(pipe, dtype):
        seen = {}

        def keep_latents(pipe, i, t, kw):
            seen["latents"] = kw["latents"]
            return kw

        pipe.scheduler = sd_scheduler(sampler)
        ref = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance,
                   latents=latents.to(dtype), height=PX, width=PX, output_type="np", callback_on_step_end=keep_latents)
        return seen["latents"], torch.from_numpy(ref.images)

    (ref_latents, ref_images), (ref_latents64, ref_images64) = (reference(pair.theirs, torch.float32),
                                                                reference(float64_twin(pair.theirs), torch.float64))
    out = pair.mine(PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance=guidance, latents=latents.clone(),
                    height=PX, width=PX, sampler=sampler, decode=False, return_latents=True)
    images = pair.mine.decode(out.latents).permute(0, 2, 3, 1)
    assert ref_images.shape == images.shape == (len(PROMPTS), PX, PX, 3)
    assert_within_floor(ref_latents, out.latents, ref_latents64)
    assert_within_floor(ref_images, images, ref_images64)
    assert (out.latents - latents).abs().max() > 0.1  # the sampler did move them
    # not trivially equal: guidance, the prompts and the sampler all change the result
    assert images.std() > 1e-3 and (images[0] - images[1]).abs().max() > 1e-3


def test_stochastic_ddim_equals_diffusers(pair):
    """DDIM with eta = 1 draws fresh noise at every step; with one generator per image, seeded seed + i, the
    noise is the same as diffusers draws from the same generators."""
    side = PX // pair.cfg.vae.downsample
    latents = torch.randn(len(PROMPTS), 4, side, side, generator=torch.Generator().manual_seed(5))
    theirs = pair.theirs
    theirs.scheduler = sd_scheduler("ddim")
    generators = [torch.Generator().manual_seed(20 + i) for i in range(len(PROMPTS))]
    ref = theirs(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, eta=1.0,
                 generator=generators, latents=latents.clone(), height=PX, width=PX, output_type="np")
    out = pair.mine(PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance=7.5, latents=latents.clone(),
                    height=PX, width=PX, sampler="ddim", eta=1.0, seed=20, decode=False, return_latents=True)
    images = pair.mine.decode(out.latents).permute(0, 2, 3, 1).numpy()
    deterministic = pair.mine(PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance=7.5, height=PX, width=PX,
                              latents=latents.clone(), sampler="ddim", decode=False, return_latents=True)
    # float64 would draw other noise: the floor is that of the same arithmetic without the draws (eta 0)
    float64_twin(theirs).scheduler = sd_scheduler("ddim")
    plain, plain64 = (torch.from_numpy(pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                                            guidance_scale=7.5, latents=latents.to(dtype), height=PX, width=PX,
                                            output_type="np").images)
                      for pipe, dtype in ((theirs, torch.float32), (float64_twin(theirs), torch.float64)))
    assert_within_floor(torch.from_numpy(ref.images), torch.from_numpy(images), None,
                        floor=float32_floor(plain, plain64))
    assert (out.latents - deterministic.latents).abs().max() > 0.1  # the fresh noise matters


# -------------------------------------------------------------------------------------------- the pipeline alone

@pytest.fixture(scope="module")
def tiny_pipe():
    return Pipeline(build_model(tiny(image_size=32), seed=0).eval())


def run(pipe, prompt="a red circle", **kw):
    kw = dict(steps=2, guidance=7.5, height=32, width=32, decode=False, return_latents=True) | kw
    return pipe(prompt, **kw)


@pytest.mark.parametrize("sampler, options", [("dpmpp_2m", {}), ("ddim", {"eta": 1.0})])
def test_image_i_of_a_batch_equals_its_seed_alone(tiny_pipe, sampler, options):
    """Also when the sampler draws noise at every step (DDIM, eta = 1): each image has its own generator."""
    batch = run(tiny_pipe, n=3, seed=40, sampler=sampler, **options)
    assert batch.seeds == [40, 41, 42]
    for i in range(3):
        alone = run(tiny_pipe, seed=40 + i, sampler=sampler, **options)
        # equal up to float rounding: a batched convolution may sum in another order
        scale = max(1.0, alone.latents.abs().max().item())
        torch.testing.assert_close(batch.latents[i:i + 1], alone.latents, atol=1e-4 * scale, rtol=0)
    assert (batch.latents[0] - batch.latents[1]).abs().max() > 0.1  # different seeds, different images


def test_same_seed_same_image(tiny_pipe):
    a, b = run(tiny_pipe, seed=7, decode=True), run(tiny_pipe, seed=7, decode=True)
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


@pytest.mark.parametrize("size", [(30, 32), (32, 36), (-8, 32), (32, 12)])
def test_bad_size_is_a_clear_error(tiny_pipe, size):
    with pytest.raises(ValueError, match="multiples of 8"):
        run(tiny_pipe, height=size[0], width=size[1])


def test_unknown_sampler_is_a_clear_error(tiny_pipe):
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*ddim"):
        run(tiny_pipe, sampler="heun")


class Recorder(AttentionHook):
    """Records what the pipeline tells it, and the first cross-attention probabilities of step 0."""

    def __init__(self):
        self.begins, self.first = [], None

    def begin_step(self, step, cond=slice(None)):
        super().begin_step(step, cond)
        self.begins.append((step, cond))

    def wants(self, layer):
        return layer.is_cross and self.step == 0 and self.first is None

    def edit_probs(self, layer, logits, probs):
        self.first = probs.clone()
        return probs


def test_hooks_see_steps_and_conditional_rows(tiny_pipe):
    steps, prompts = 3, ["a red circle", "a blue square"]
    guided, plain = Recorder(), Recorder()
    run(tiny_pipe, prompts, steps=steps, guidance=7.5, negative_prompt="grey", hooks=[guided], seed=1)
    run(tiny_pipe, prompts, steps=steps, guidance=1.0, hooks=[plain], seed=1)
    assert [s for s, _ in guided.begins] == [0, 1, 2] == [s for s, _ in plain.begins]
    assert all(c == slice(2, 4) for _, c in guided.begins)   # rows 2..3 of [uncond, uncond, cond, cond]
    assert all(c == slice(None) for _, c in plain.begins)     # no guidance: every row is conditional
    assert guided.first.shape[0] == 4 and plain.first.shape[0] == 2
    # step 0 starts from the same latents: the rows `cond` names are the ones the prompts alone give
    torch.testing.assert_close(guided.first[guided.begins[0][1]], plain.first, atol=1e-6, rtol=0)
    assert (guided.first[:2] - plain.first).abs().max() > 1e-4
    assert tiny_pipe.model.hooks == []  # removed afterwards


def test_reads_the_folder_exactly_as_save_pretrained_writes_it(pair, tmp_path):
    # transformers 5 writes the text encoder without the `text_model.` level and the tokenizer as tokenizer.json
    pair.theirs.save_pretrained(tmp_path / "raw")
    mine = Pipeline.from_checkpoint(tmp_path / "raw")
    assert mine.tokenizer.pad_with_eot == (pair.layout == "sd1")
