"""Composable Diffusion (regulation/composable.py, `Pipeline(..., concepts=...)`): the pipeline's batched guidance
equals the formula computed one text at a time (tests/reference_composable.py), one concept weighted by the
guidance scale is plain classifier-free guidance, SDXL composes too, and prompts split as documented.

diffusers ships no composable pipeline in its wheel (only the community file examples/community/
composable_stable_diffusion.py, which is not importable from the package), so the reference here is the formula.
"""
import numpy as np
import pytest
import torch

from minisd.attention import AttentionHook
from minisd.checkpoint import build_model
from minisd.config import tiny, tiny_sdxl
from minisd.pipeline import Pipeline
from regulation.composable import composable_options, concept_weights, split_concepts

try:
    from tests.reference_composable import composed_latents
except ImportError:  # tests/ itself on sys.path
    from reference_composable import composed_latents

TOL = 1e-5
PX = 32
CONCEPTS = [("a red circle", 7.5), ("a blue square", 3.0), ("a yellow star", -2.0)]


# float64 weights: a batched UNet call and one call per text then differ by rounding far below the tolerance (in
# float32 a batched convolution may sum in another order, enough on its own to pass it); the samplers and the
# guidance sums stay in float32, as in every run.
@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request):
    cfg = tiny(image_size=PX) if request.param == "sd" else tiny_sdxl(image_size=PX)
    model = build_model(cfg, dtype=torch.float64, seed=0).eval()
    if cfg.text2:   # a projection of this scale keeps the concepts' pooled texts (and a mix-up of them) apart
        projection = model.conditioner.embedders[1].text_projection
        projection.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return Pipeline(model)


@pytest.fixture(scope="module")
def sd():
    return Pipeline(build_model(tiny(image_size=PX), dtype=torch.float64, seed=0).eval())


def run(pipe, prompt="a red circle and a blue square", **kw):
    kw = dict(steps=3, guidance=7.5, height=PX, width=PX, sampler="ddim", decode=False, return_latents=True) | kw
    return pipe(prompt, **kw)


def starting_noise(pipe, seeds):
    return pipe.initial_latents([torch.Generator().manual_seed(s) for s in seeds], PX, PX)


# ------------------------------------------------------------------------------------- the pipeline's guidance

@pytest.mark.parametrize("negative", ["", "blurry, grey"])
def test_pipeline_equals_the_formula_one_text_at_a_time(pipe, negative):
    """Three concepts (one of negative weight), two images of a batch: each image's latents and pixels equal the
    formula run alone on that image's starting noise (SDXL: an empty negative prompt is zeros in both)."""
    out = run(pipe, negative_prompt=negative, concepts=CONCEPTS, n=2, seed=30, decode=True)
    noise = starting_noise(pipe, [30, 31])
    for i in range(2):
        ref = composed_latents(pipe, CONCEPTS, noise[i:i + 1], steps=3, negative=negative)
        d = (out.latents[i:i + 1] - ref).abs().max().item()
        assert d <= TOL, f"image {i}: latents differ by {d:.3g}"
        pixels = np.asarray(out.images[i], dtype=np.float32)
        ref_pixels = pipe.decode(ref).clamp(0, 1).permute(0, 2, 3, 1)[0].numpy() * 255
        assert np.abs(pixels - ref_pixels).max() <= 1.0   # the same up to 8-bit rounding
    assert (out.latents - noise).abs().max() > 0.1   # the sampler did move them
    assert (out.latents[0] - out.latents[1]).abs().max() > 0.1   # two seeds, two images
    if pipe.cfg.text2:   # the concepts' pooled texts differ, so giving one concept another's would show
        context, pooled = pipe.encode([CONCEPTS[0][0], CONCEPTS[1][0]])
        assert (pooled[0] - pooled[1]).abs().max() > 1e-2


def test_dpmpp_2m_equals_the_formula(sd):
    """A multistep sampler sees the composed prediction too."""
    out = run(sd, concepts=CONCEPTS[:2], sampler="dpmpp_2m", seed=4)
    ref = composed_latents(sd, CONCEPTS[:2], starting_noise(sd, [4]), steps=3, sampler="dpmpp_2m")
    assert (out.latents - ref).abs().max() <= TOL


def test_one_concept_weighted_by_the_guidance_is_classifier_free_guidance(pipe):
    """The prompt as its only concept, at the guidance scale: the same batch, the same sums, the same bits."""
    for sampler in ("ddim", "dpmpp_2m"):
        prompt = "a red circle left of a blue square"
        plain = run(pipe, prompt, guidance=6.0, negative_prompt="grey", sampler=sampler, n=2, seed=3)
        one = run(pipe, prompt, guidance=6.0, negative_prompt="grey", sampler=sampler, n=2, seed=3,
                  concepts=[(prompt, 6.0)])
        assert torch.equal(plain.latents, one.latents)


def test_image_i_of_a_batch_equals_its_seed_alone(sd):
    batch = run(sd, concepts=CONCEPTS, n=3, seed=40, eta=1.0)
    assert batch.seeds == [40, 41, 42]
    for i in range(3):
        alone = run(sd, concepts=CONCEPTS, seed=40 + i, eta=1.0)
        scale = max(1.0, alone.latents.abs().max().item())
        torch.testing.assert_close(batch.latents[i:i + 1], alone.latents, atol=1e-4 * scale, rtol=0)


def test_every_concept_counts_and_their_order_does_not(sd):
    two = run(sd, concepts=CONCEPTS[:2], seed=5).latents
    first = run(sd, concepts=CONCEPTS[:1], seed=5).latents
    swapped = run(sd, concepts=CONCEPTS[1::-1], seed=5).latents
    zero_third = run(sd, concepts=CONCEPTS[:2] + [("a yellow star", 0.0)], seed=5).latents
    assert (two - first).abs().max() > 1e-3
    torch.testing.assert_close(swapped, two, atol=TOL, rtol=0)
    torch.testing.assert_close(zero_third, two, atol=TOL, rtol=0)
    # the prompt itself is not read: only its concepts
    assert torch.equal(run(sd, "anything else", concepts=CONCEPTS[:2], seed=5).latents, two)


def test_composable_options_drive_the_pipeline(sd):
    prompt = "a red circle and a blue square"
    out = run(sd, prompt, seed=6, **composable_options(prompt, 7.5))
    ref = run(sd, prompt, seed=6, concepts=[("a red circle", 7.5), ("a blue square", 7.5)])
    assert torch.equal(out.latents, ref.latents)


# ------------------------------------------------------------------------------------------------- refusals

class Observer(AttentionHook):
    def wants(self, layer):
        return False


@pytest.mark.parametrize("kw, says", [
    (dict(guidance=1.0), "guidance above 1"),
    (dict(guidance=0.5), "guidance above 1"),
    (dict(hooks=[Observer()]), "composable concepts cannot be combined with attention editors"),
    (dict(concepts=[]), "non-empty list"),
    (dict(concepts=["a cat"]), r"\(text, weight\) pair"),
    (dict(concepts=[("a cat", "7.5")]), "finite number"),
    (dict(concepts=[("a cat", float("nan"))]), "finite number"),
    (dict(concepts=[("a cat", True)]), "finite number"),
])
def test_bad_concepts_are_clear_errors(sd, kw, says):
    kw = dict(concepts=CONCEPTS) | kw
    with pytest.raises(ValueError, match=says):
        run(sd, **kw)


def test_several_prompts_are_refused(sd):
    with pytest.raises(ValueError, match="compose one prompt; got 2 prompts"):
        run(sd, ["a cat and a dog", "a bird and a fish"], concepts=CONCEPTS)


# ------------------------------------------------------------------------------------------ splitting prompts

@pytest.mark.parametrize("prompt, concepts", [
    ("a red circle and a blue square", ["a red circle", "a blue square"]),
    ("a cat, a dog and a bird", ["a cat", "a dog", "a bird"]),
    ("a cat, a dog, and a bird", ["a cat", "a dog", "a bird"]),
    ("A photo of Obama AND a photo of Biden", ["A photo of Obama", "a photo of Biden"]),
    ("  a cat   and  a dog ", ["a cat", "a dog"]),
    ("a cat,a dog", ["a cat", "a dog"]),
    ("a cat, , a dog,", ["a cat", "a dog"]),
    ("sand and a band near the andes", ["sand", "a band near the andes"]),
    ("a castle in a forest | grainy, fog", ["a castle in a forest", "grainy, fog"]),
    ("mystical trees | A magical pond | dark", ["mystical trees", "A magical pond", "dark"]),
    ("black and white | a cat", ["black and white", "a cat"]),
])
def test_split_concepts(prompt, concepts):
    assert split_concepts(prompt) == concepts


@pytest.mark.parametrize("prompt", ["a red circle", "", "   ", "a cat and", ", and ,", "a cat |", "|", "android"])
def test_fewer_than_two_concepts_is_a_clear_error(prompt):
    with pytest.raises(ValueError, match="at least 2 concepts"):
        split_concepts(prompt)
    with pytest.raises(ValueError, match="at least 2 concepts"):
        composable_options(prompt, 7.5)


def test_a_prompt_must_be_a_string():
    with pytest.raises(ValueError, match="must be a string"):
        split_concepts(["a cat", "a dog"])


def test_default_weights_are_the_guidance_scale():
    assert composable_options("a cat, a dog and a bird", 7.5) == {
        "concepts": [("a cat", 7.5), ("a dog", 7.5), ("a bird", 7.5)]}


@pytest.mark.parametrize("weights, expected", [
    (None, [5.0, 5.0, 5.0]),
    ("", [5.0, 5.0, 5.0]),
    ("7.5 | 3 | -2", [7.5, 3.0, -2.0]),
    ("2", [2.0, 5.0, 5.0]),
    ([1, 2.5], [1.0, 2.5, 5.0]),
    ((1.0, 2.0, 3.0), [1.0, 2.0, 3.0]),
])
def test_weights(weights, expected):
    assert concept_weights(weights, 3, 5.0) == expected
    got = composable_options("a | b | c", 5.0, weights)["concepts"]
    assert got == list(zip("abc", expected))


@pytest.mark.parametrize("weights, says", [
    ("1 | 2 | 3 | 4", "4 concept weights for 3 concepts"),
    ([1, 2, 3, 4], "4 concept weights for 3 concepts"),
    ("1 | x", "numbers separated by"),
    ("1 || 2", "numbers separated by"),
    ([1, float("inf")], "finite number"),
    (["1"], "finite number"),
])
def test_bad_weights_are_clear_errors(weights, says):
    with pytest.raises(ValueError, match=says):
        composable_options("a | b | c", 5.0, weights)


@pytest.mark.parametrize("guidance", [1.0, 0.0, -3.0, float("nan"), float("inf"), "7.5", None])
def test_guidance_must_be_above_1(guidance):
    with pytest.raises(ValueError, match="guidance scale above 1"):
        composable_options("a cat and a dog", guidance)
