"""DenseDiffusion (regulation/dense_diffusion.py) against the straightforward reference written from the authors'
code (tests/reference_dense_diffusion.py): one layer's modulated logits; whole runs on a tiny random SD and a tiny
random SDXL; nothing changes at zero strength; the timesteps of each sampler; layouts and their errors."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minisd.checkpoint import build_model
from minisd.config import tiny, tiny_sdxl
from minisd.pipeline import Pipeline
from minisd.samplers import Schedule
from regulation.dense_diffusion import (NEEDS_LAYOUT, DenseDiffusion, DenseDiffusionConfig, LayoutEntry,
                                        make_dense, masks_from_boxes, masks_from_images, parse_layout,
                                        phrase_embeddings, step_timesteps)
from regulation.targets import resolve_targets

try:
    from tests.reference_dense_diffusion import (ReferenceDense, reference_maps, reference_modulate, reference_treg,
                                           with_background)
except ImportError:  # tests/ itself on sys.path
    from reference_dense_diffusion import (ReferenceDense, reference_maps, reference_modulate, reference_treg,
                                           with_background)

PROMPT = "a red circle and a blue square"
LAYOUT = "red circle:0,0,0.5,0.6; blue square:0.4,0.3,1,1"     # overlapping: pixels in two regions
TOL = 1e-5


def assert_close(ours, ref, tol=TOL):
    """Largest difference at most tol of the reference's largest magnitude."""
    assert ours.shape == ref.shape
    rel = ((ours - ref).abs().amax() / ref.abs().amax()).item()
    assert rel <= tol, f"largest difference is {rel:.3g} of the output scale (tolerance {tol})"


def layer(hw, is_cross, name=None):
    return SimpleNamespace(name=name or f"toy.attn{2 if is_cross else 1}", hw=hw, is_cross=is_cross)


def random_masks(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(h, w, generator=g) for _ in range(n)]


# --------------------------------------------------------------------------------------------- one layer

@pytest.mark.parametrize("background", ["region", "none"])
@pytest.mark.parametrize("is_cross,hw,cond", [(True, (6, 5), "half"), (False, (6, 5), "half"),
                                              (True, (4, 4), "all"), (False, (8, 3), "all")])
def test_layer_logits_equal_reference(is_cross, hw, cond, background):
    masks = random_masks(3, 13, 17, seed=hw[0] * hw[1])
    positions = [[2, 3], [5], [3, 7]]                  # token 3 in two phrases: the later one wins
    config = DenseDiffusionConfig(creg=1.3, sreg=0.4, sizereg=0.7, background=background)
    hook = DenseDiffusion(list(zip(positions, masks)), 10, config, timesteps=[900 - 90 * i for i in range(10)])
    if background == "region":   # the reference is given the demo's layout, background segment included
        masks, positions = with_background(masks, positions)
        assert len(masks) == 4
    hook.begin_step(1, slice(2, 4) if cond == "half" else slice(None))
    b, heads, q = 4, 3, hw[0] * hw[1]
    k = 77 if is_cross else q
    logits = 4 * torch.randn(b, heads, q, k, generator=torch.Generator().manual_seed(5))
    before = logits.clone()
    ours = hook.edit_logits(layer(hw, is_cross), logits)
    assert torch.equal(logits, before)                 # the unedited logits stay for the other hooks

    sreg_map, creg_map, size = reference_maps(masks, positions, hw, config.sizereg, num_tokens=77)
    rows = None if cond == "half" else range(b * heads)
    ref = reference_modulate(logits.reshape(b * heads, q, k), creg_map if is_cross else sreg_map, size,
                             config.creg if is_cross else config.sreg, reference_treg(810),
                             rows).reshape(b, heads, q, k)
    assert_close(ours, ref)
    if cond == "half":
        assert torch.equal(ours[:2], logits[:2])       # the unconditional rows are left alone
    assert (ours - logits).abs().amax() > 0.1


def test_full_strength_sends_logits_to_the_row_extremes():
    """With lam = 1 (t = T, no size term) a pair in a region takes the row's maximum, any other pair its minimum."""
    mask = torch.zeros(4, 4)
    mask[:2] = 1                                        # the top half
    hook = DenseDiffusion([([3], mask)], 1, DenseDiffusionConfig(creg=1.0, sizereg=0.0), timesteps=[1000])
    logits = torch.randn(1, 2, 16, 77)
    out = hook.edit_logits(layer((4, 4), True), logits)
    top, bottom = logits.amax(-1), logits.amin(-1)
    torch.testing.assert_close(out[..., :8, 3], top[..., :8])
    torch.testing.assert_close(out[..., 8:, 3], bottom[..., 8:])
    others = [j for j in range(77) if j != 3]
    torch.testing.assert_close(out[..., others], bottom[..., None].expand(-1, -1, -1, 76))


def test_size_term_and_steps():
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1                                    # a quarter of the image
    alone = DenseDiffusion([([2], mask)], 50, DenseDiffusionConfig(background="none"))
    inside, size = alone.regions((4, 4), False, 16)
    assert inside.sum() == 4 * 4                        # the 4 pixels of the region see each other
    assert size.view(4, 4)[0, 0] == 0.75 and size.view(4, 4)[3, 3] == 1.0
    hook = DenseDiffusion([([2], mask)], 50)            # the other 12 pixels: the background region
    inside, size = hook.regions((4, 4), False, 16)
    assert inside.sum() == 4 * 4 + 12 * 12
    assert size.view(4, 4)[0, 0] == 0.75 and size.view(4, 4)[3, 3] == 0.25
    assert hook.edit_steps == 15                        # the authors' COUNT / 32 < 50 * 0.3
    assert hook.timesteps[:2] == [981.0, 961.0]         # default: SD's leading timesteps, as their DDIM
    hook.begin_step(14)
    assert hook.wants(layer((4, 4), False)) and hook.wants(layer((4, 4), True))
    hook.begin_step(15)
    assert not hook.wants(layer((4, 4), True))
    zero = DenseDiffusion([([2], mask)], 50, DenseDiffusionConfig(creg=0.0, sreg=0.0))
    assert not zero.wants(layer((4, 4), True)) and not zero.wants(layer((4, 4), False))


# ------------------------------------------------------------------------------------------- timesteps

def test_step_timesteps_equal_diffusers_schedulers():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    for cls, name in [(DDIMScheduler, "ddim"), (DPMSolverMultistepScheduler, "dpmpp_2m"),
                      (EulerDiscreteScheduler, "euler")]:
        for spacing in ("leading", "trailing"):
            s = cls(timestep_spacing=spacing, **kw)
            s.set_timesteps(7)
            assert step_timesteps(Schedule(spacing=spacing), 7, name) == pytest.approx(s.timesteps.tolist())
    with pytest.raises(ValueError, match="unknown sampler"):
        step_timesteps(Schedule(), 5, "heun")


# ------------------------------------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def pipe():
    return Pipeline(build_model(tiny(image_size=32), seed=3).eval())


@pytest.fixture(scope="module")
def xl():
    return Pipeline(build_model(tiny_sdxl(image_size=32), seed=4).eval())


def run(pipe, hooks, steps=5, sampler="ddim", **kw):
    kw.setdefault("height", pipe.cfg.image_size)
    kw.setdefault("width", pipe.cfg.image_size)
    return pipe(PROMPT, steps=steps, seed=7, hooks=hooks, sampler=sampler, guidance=5.0, decode=False,
                return_latents=True, **kw).latents


def both_runs(pipe, steps=5, config=None, sampler="ddim", height=None, width=None):
    """Latents with our hook, with the reference hook, and plain."""
    config = config or DenseDiffusionConfig(reg_part=0.6)
    height, width = height or pipe.cfg.image_size, width or pipe.cfg.image_size
    size = dict(height=height, width=width)
    hook = make_dense(pipe, PROMPT, steps, LAYOUT, config, sampler=sampler, **size)
    assert hook.edit_steps == round(steps * config.reg_part)
    ours = run(pipe, [hook], steps, sampler, **size)
    # the reference reads its timesteps from diffusers' scheduler, as the authors do
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    cls = DDIMScheduler if sampler == "ddim" else DPMSolverMultistepScheduler
    scheduler = cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                    timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    masks = masks_from_boxes([(0, 0, 0.5, 0.6), (0.4, 0.3, 1, 1)], height, width)
    positions = [t.positions for t in resolve_targets(pipe.tokenizer, PROMPT, ["red circle", "blue square"])]
    if config.background == "region":
        masks, positions = with_background(masks, positions)
    f = pipe.cfg.vae.downsample
    ref_hook = ReferenceDense(list(masks), positions, scheduler.timesteps.tolist(),
                              len(pipe.model.attention_layers()), steps, config.creg, config.sreg,
                              config.sizereg, config.reg_part, latent_hw=(height // f, width // f))
    ref = run(pipe, [ref_hook], steps, sampler, **size)
    assert ref_hook.count == steps * len(pipe.model.attention_layers())
    return ours, ref, run(pipe, [], steps, sampler, **size), hook, ref_hook


def test_run_equals_reference(pipe):
    ours, ref, plain, hook, ref_hook = both_runs(pipe)
    assert_close(ours, ref)
    assert (ours - plain).abs().amax() > 1e-2          # the layout did something
    names = {m.name for m in pipe.model.attention_layers()}
    assert hook.edited == names                         # every self- and cross-attention layer
    assert len(ref_hook.modulated) == 3 * len(names)    # three steps of five


def test_uncovered_pixels_form_a_tokenless_region(pipe):
    """The layout's boxes leave pixels uncovered: by default they become a region of no token (the authors'
    background segment); background="none" gives the earlier behaviour, still equal to the reference without it."""
    hook = make_dense(pipe, PROMPT, 5, LAYOUT)
    covered = masks_from_boxes([(0, 0, 0.5, 0.6), (0.4, 0.3, 1, 1)], pipe.cfg.image_size, pipe.cfg.image_size)
    assert hook.positions[-1] == [] and len(hook.positions) == 3
    assert torch.equal(hook.masks[-1], (covered.amax(0) == 0).float())
    inside, size = hook.regions((8, 8), True, 77)
    back = F.interpolate(hook.masks[-1][None, None], size=(8, 8), mode="nearest").flatten().bool()
    assert back.any() and not inside[back].any()          # no token is "inside" on the background
    assert torch.allclose(size[back, 0], 1 - back.float().mean())   # its own size term, not 1
    self_inside, _ = hook.regions((8, 8), False, 64)
    assert self_inside[back][:, back].all()               # background pixels attend to each other

    none = DenseDiffusionConfig(reg_part=0.6, background="none")
    ours, ref, plain, hook, _ = both_runs(pipe, config=none)
    assert len(hook.positions) == 2
    assert_close(ours, ref)
    region, _, _, _, _ = both_runs(pipe)
    assert (region - ours).abs().amax() > 1e-3            # the background region changes the run

    full = make_dense(pipe, PROMPT, 5, "red circle:0,0,0.5,1; blue square:0.5,0,1,1")
    assert len(full.positions) == 2                       # nothing uncovered: no background region
    with pytest.raises(ValueError, match="background"):
        DenseDiffusionConfig(background="sky")


def test_non_square_run_equals_reference(pipe):
    ours, ref, plain, _, _ = both_runs(pipe, steps=4, config=DenseDiffusionConfig(reg_part=0.5), width=48)
    assert ours.shape[-2:] == (16, 24)
    assert_close(ours, ref)
    assert (ours - plain).abs().amax() > 1e-2


def test_zero_strength_leaves_the_run_unchanged(pipe):
    hook = make_dense(pipe, PROMPT, 4, LAYOUT, DenseDiffusionConfig(creg=0.0, sreg=0.0), sampler="ddim")
    assert torch.equal(run(pipe, [hook], 4), run(pipe, [], 4))
    assert not hook.edited


def test_sdxl_run_equals_reference(xl):
    ours, ref, plain, hook, _ = both_runs(xl, steps=4, config=DenseDiffusionConfig(reg_part=0.5), sampler="dpmpp_2m")
    assert_close(ours, ref)
    assert (ours - plain).abs().amax() > 1e-3
    assert hook.edited == {m.name for m in xl.model.attention_layers()}


def test_phrase_embeddings(pipe):
    phrases = ["red circle", "blue square"]
    targets = resolve_targets(pipe.tokenizer, PROMPT, phrases)
    plain = pipe.encode_prompts([PROMPT])[0]
    with phrase_embeddings(pipe, PROMPT, phrases):
        swapped, _ = pipe.encode([PROMPT, ""])
        assert torch.equal(swapped[1], pipe.encode_prompts([""])[0])    # the negative prompt is untouched
        edited = run(pipe, [], 3)
    assert "encode" not in vars(pipe)
    changed = set()
    for t, phrase in zip(targets, phrases):
        alone = pipe.encode_prompts([phrase])[0]
        n = len(t.positions)
        torch.testing.assert_close(swapped[0, t.positions], alone[1:1 + n])
        changed.update(t.positions)
    rest = [p for p in range(77) if p not in changed]
    assert torch.equal(swapped[0, rest], plain[rest])
    assert not torch.equal(edited, run(pipe, [], 3))


# ------------------------------------------------------------------------------------------- layouts

def test_parse_layout():
    entries = parse_layout(" red circle : 0.1, 0.1,0.5,0.5 ;square=masks/sq.png;; dog#2:0,0,1,1;")
    assert entries == [LayoutEntry("red circle", box=(0.1, 0.1, 0.5, 0.5)),
                       LayoutEntry("square", path="masks/sq.png"), LayoutEntry("dog#2", box=(0.0, 0.0, 1.0, 1.0))]
    assert parse_layout("circle=C:\\masks\\a.png")[0].path == "C:\\masks\\a.png"


@pytest.mark.parametrize("spec,message", [
    ("circle:0.1,0.1,1.5,0.5", "'circle'.*outside"),
    ("circle:0.5,0.1,0.1,0.5", "'circle'.*empty"),
    ("circle:0.1,0.1,0.5", "four numbers"),
    ("circle:a,b,c,d", "four numbers"),
    ("circle", "no region"),
    (":0,0,1,1", "no phrase"),
    ("circle=", "no mask file"),
    ("", "needs a layout"),
    (" ; ", "needs a layout"),
])
def test_bad_layouts(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layout(spec)


def test_masks_from_boxes_and_images(tmp_path):
    m = masks_from_boxes([(0, 0, 0.5, 1), (0.5, 0.25, 1, 0.75)], 4, 8)
    assert m.shape == (2, 4, 8)
    assert m[0, :, :4].all() and not m[0, :, 4:].any()
    assert m[1, 1:3, 4:].all() and m[1].sum() == 8        # boxes meeting at x = 0.5 share no pixel
    with pytest.raises(ValueError, match="'thin'.*covers no pixel"):
        masks_from_boxes([(0.1, 0.1, 0.11, 0.9)], 4, 8, ["thin"])
    from PIL import Image
    img = Image.new("L", (20, 10), 0)
    img.paste(255, (10, 0, 20, 10))                        # right half white
    img.paste(100, (0, 0, 10, 5))                          # dark grey: outside
    img.save(tmp_path / "right.png")
    m = masks_from_images([tmp_path / "right.png"], 4, 8, ["square"])[0]
    assert m[:, 4:].all() and not m[:, :4].any()
    with pytest.raises(ValueError, match="'square'.*nope.png.*does not exist"):
        masks_from_images([tmp_path / "nope.png"], 4, 8, ["square"])
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        masks_from_images([tmp_path / "bad.png"], 4, 8)
    Image.new("L", (4, 4), 0).save(tmp_path / "black.png")
    with pytest.raises(ValueError, match="no white pixel"):
        masks_from_images([tmp_path / "black.png"], 4, 4)


def test_make_dense_inputs_and_errors(pipe, tmp_path):
    for missing in (None, "", []):
        with pytest.raises(ValueError, match="DenseDiffusion needs a layout: --layout"):
            make_dense(pipe, PROMPT, 5, missing)
    assert NEEDS_LAYOUT.startswith("DenseDiffusion needs a layout: --layout")
    with pytest.raises(ValueError, match="layout: target 'triangle'"):
        make_dense(pipe, PROMPT, 5, "triangle:0,0,1,1")
    with pytest.raises(ValueError, match="mask file"):
        make_dense(pipe, PROMPT, 5, f"circle={tmp_path / 'missing.png'}")
    with pytest.raises(TypeError, match="DenseDiffusionConfig"):
        make_dense(pipe, PROMPT, 5, LAYOUT, config=object())
    with pytest.raises(ValueError, match="sreg"):
        DenseDiffusionConfig(sreg=-1)
    with pytest.raises(ValueError, match="reg_part"):
        DenseDiffusionConfig(reg_part=1.5)
    # the same layout as a string, as (phrase, box) pairs, and with a mask tensor
    tensor = masks_from_boxes([(0.4, 0.3, 1, 1)], 32, 32)[0]
    a = make_dense(pipe, PROMPT, 5, LAYOUT)
    b = make_dense(pipe, PROMPT, 5, [("red circle", (0, 0, 0.5, 0.6)), ("blue square", tensor)])
    assert a.positions == b.positions == [[2, 3], [6, 7], []]   # the last: the background region
    assert torch.equal(a.masks, b.masks)
    assert a.timesteps == step_timesteps(Schedule(), 5, "dpmpp_2m")   # the pipeline's default sampler
    with pytest.raises(ValueError, match="mask values"):
        DenseDiffusion([([2], torch.full((4, 4), 2.0))], 5)
    with pytest.raises(ValueError, match="start token"):
        DenseDiffusion([([0], torch.ones(4, 4))], 5)
    with pytest.raises(ValueError, match="needs a layout"):
        DenseDiffusion([], 5)
