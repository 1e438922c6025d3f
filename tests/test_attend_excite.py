"""Attend-and-Excite (regulation/attend_excite.py) against the straightforward diffusers-order reference
(tests/reference_attend_excite.py): the smoothing, the loss and its gradient on random maps; the whole step with
refinement on a small differentiable stand-in for the UNet (where thresholds can be reached) and on a tiny random
SD; the cap on refinement; plain steps after max_iter_to_alter; bfloat16; the pipeline and make_editor."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minisd.checkpoint import build_model
from minisd.config import tiny
from minisd.blocks import block_of
from minisd.pipeline import Pipeline
from regulation.attend_excite import (AttendExcite, AttendExciteConfig, default_layers, excite_loss, smooth,
                                      smoothing_kernel, step_sizes)
from regulation.editors import METHODS, make_editor
from regulation.targets import resolve_targets

try:
    from tests.reference_attend_excite import (ReferenceStore, reference_kernel, reference_loss,
                                               reference_max_attention, reference_smooth, reference_step)
except ImportError:  # tests/ itself on sys.path
    from reference_attend_excite import (ReferenceStore, reference_kernel, reference_loss, reference_max_attention,
                                         reference_smooth, reference_step)

PROMPT = "a red circle and a blue square"


def random_attention(b, h, w, num_tokens, seed, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(b, h, w, num_tokens, generator=g)).softmax(-1)


# --------------------------------------------------------------------------------------------- pure functions

@pytest.mark.parametrize("size,sigma", [(3, 0.5), (5, 1.0)])
def test_smoothing_equals_reference(size, sigma):
    torch.testing.assert_close(smoothing_kernel(size, sigma), reference_kernel(size, sigma))
    maps = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(size))
    ours = smooth(maps, smoothing_kernel(size, sigma))
    ref = torch.stack([torch.stack([reference_smooth(m, size, sigma) for m in row]) for row in maps])
    torch.testing.assert_close(ours, ref)
    assert ours.shape == maps.shape and not torch.allclose(ours, maps)


def test_smoothing_rejects_tiny_maps():
    with pytest.raises(ValueError, match="too small"):
        smooth(torch.rand(1, 1, 1, 1), smoothing_kernel())


@pytest.mark.parametrize("subtokens,span", [("max", "all"), ("sum", "all"), ("max", "prompt")])
def test_loss_and_gradient_equal_reference_on_random_maps(subtokens, span):
    config = AttendExciteConfig(subtokens=subtokens, softmax_span=span)
    eot = 9
    targets = [[2], [4, 5], [7]]
    for h, w in [(4, 4), (8, 6), (16, 16)]:
        attn = random_attention(3, h, w, 77, seed=h * w).requires_grad_(True)
        loss, maxima = excite_loss(attn, targets, config, eot=eot)
        (ours,) = torch.autograd.grad(loss.sum(), attn)
        attn_ref = attn.detach().clone().requires_grad_(True)
        ref_loss = []
        for image in attn_ref:
            m = reference_max_attention(image, targets, end=eot if span == "prompt" else -1, subtokens=subtokens)
            torch.testing.assert_close(maxima[len(ref_loss)], torch.stack(m))
            ref_loss.append(reference_loss(m))
        torch.testing.assert_close(loss, torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in ref_loss]))
        (ref,) = torch.autograd.grad(sum(ref_loss), attn_ref)
        torch.testing.assert_close(ours, ref)
        assert ours.abs().sum() > 0


def test_zero_loss_when_every_target_is_attended():
    attn = torch.full((1, 4, 4, 77), 1e-3)
    attn[..., 3] = attn[..., 6] = 1.0          # two tokens take everything: each softmax maximum is ~0.5
    loss, maxima = excite_loss(attn, [[3]], AttendExciteConfig(temperature=1e4))
    assert loss.item() < 0.51 and maxima.item() > 0.49
    attn[..., 6] = 1e-3
    loss, _ = excite_loss(attn, [[3]], AttendExciteConfig(temperature=1e4))
    assert loss.item() < 1e-6


def test_step_sizes_follow_diffusers():
    for steps in (1, 25, 50):
        expected = 20 * np.sqrt(np.linspace(1.0, 0.5, steps))
        np.testing.assert_allclose(step_sizes(steps), expected, rtol=1e-12)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="softmax_span"):
        AttendExciteConfig(softmax_span="eot")
    with pytest.raises(ValueError, match="thresholds"):
        AttendExciteConfig(thresholds={0: 1.5})
    with pytest.raises(ValueError, match="start-of-text"):
        AttendExcite([0, 3], 50, select=lambda layer: True)
    with pytest.raises(ValueError, match="token span"):
        excite_loss(random_attention(1, 4, 4, 77, 0), [[76]])
    with pytest.raises(ValueError, match="end-of-text"):
        excite_loss(random_attention(1, 4, 4, 77, 0), [[3]], AttendExciteConfig(softmax_span="prompt"))


# --------------------------------------------------------------------- a differentiable stand-in for the UNet

class ToyUNet:
    """One 'cross-attention layer' whose probabilities are a smooth function of the latents x (b, 2, 4, 4): the
    refinement can actually reach its thresholds here, unlike on a random UNet. Calls the hooks as minisd's
    attention does (explicit path only when a hook wants the layer)."""
    heads, tokens = 2, 12

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = 0.2 * torch.randn(self.heads, 2, self.tokens, generator=g)
        self.weight[:, 0, 3] = self.weight[:, 1, 8] = 1.0   # channel 0 drives token 3, channel 1 token 8
        self.layer = SimpleNamespace(name="toy.attn2", is_cross=True, hw=(4, 4))
        self.hooks, self.calls = [], 0

    def __call__(self, x, t, rows=None):
        self.calls += 1
        logits = torch.einsum("bcq,hcl->bhql", x.flatten(2).float(), self.weight)
        probs = logits.softmax(-1)
        for hook in self.hooks:
            if hook.wants(self.layer):
                probs = hook.edit_probs(self.layer, logits, probs)
        return x


def run_both(x, i, targets, config, num_steps=30, toy=None):
    toy = toy or ToyUNet()
    hook = AttendExcite(targets, num_steps, config, select=lambda layer: True)
    toy.hooks = [hook]
    ours = hook.edit_latents(x, 500.0, i, toy)
    store = ReferenceStore(lambda layer: True)
    toy.hooks = [store]
    ref, ref_losses = reference_step(lambda latent, t, r: toy(latent, t), store, x, 500.0, i, targets, num_steps,
                                     config.max_iter_to_alter, config.thresholds, config.scale_factor,
                                     config.max_refinement_steps)
    return ours, ref, hook


def test_refinement_equals_reference_on_toy_unet():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    targets = [[3], [8]]
    # first with no threshold at this step (the plain update), then with one each image reaches in a few tries
    plain, plain_ref, hook = run_both(x, 1, targets, AttendExciteConfig())
    torch.testing.assert_close(plain, plain_ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, x)
    assert hook.history[1]["tries"] == 0 and hook.history[1]["loss_refined"] is None
    config = AttendExciteConfig(thresholds={1: 0.5}, max_refinement_steps=20, measure_after=True)
    before = hook.history[1]["loss_before"]
    assert min(before) <= 0.5 < max(before)     # a mixed batch: some images refine, some do not
    ours, ref, hook = run_both(x, 1, targets, config)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    rec = hook.history[1]
    assert rec["tries"] >= 2 and not any(rec["gave_up"])
    assert max(rec["loss_refined"]) <= 0.5        # every image reached the goal
    assert max(rec["loss_after"]) < max(rec["loss_before"])


def test_refinement_stops_at_the_cap():
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    config = AttendExciteConfig(thresholds={0: 1.0}, max_refinement_steps=3)   # max attention 1: unreachable
    toy = ToyUNet()
    ours, ref, hook = run_both(x, 0, [[2], [5]], config, toy=toy)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    rec = hook.history[0]
    assert rec["tries"] == 3 and all(rec["gave_up"])
    # ours: 1 pass + one per try; the reference (diffusers) makes 1 + 3 + 1 per image
    assert toy.calls == (1 + 3) + 2 * (1 + 3 + 1)


def test_steps_after_max_iter_to_alter_are_plain():
    toy = ToyUNet()
    hook = AttendExcite([[3]], 10, AttendExciteConfig(max_iter_to_alter=2), select=lambda layer: True)
    toy.hooks = [hook]
    x = torch.randn(1, 2, 4, 4)

    def no_pass(x, t):
        raise AssertionError("a plain step must not run the conditional pass")
    for i in (2, 5, 9):
        hook.begin_step(i)
        assert hook.edit_latents(x, 100.0, i, no_pass) is x
        assert not hook.wants(toy.layer)
    assert not hook.history


# --------------------------------------------------------------------------------------- a tiny random SD

@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = build_model(tiny(image_size=32)).eval()
    return Pipeline(model)


def tiny_step(pipe, x, i, config, dtype=torch.float32):
    """Our hook's step and the reference's on the tiny SD; returns (ours, reference or None, hook)."""
    model = pipe.model.to(dtype)
    cond = pipe.encode_prompts([PROMPT] * x.shape[0])
    targets = [t.positions for t in resolve_targets(pipe.tokenizer, PROMPT, ["circle", "square"])]

    def cond_unet(latents, t, rows=slice(None)):
        return model.unet(latents.to(dtype), torch.tensor([t] * latents.shape[0]), cond[rows]).float()
    hook = AttendExcite(targets, 50, config, model_config=pipe.cfg)
    model.set_hooks([hook])
    ours = hook.edit_latents(x, 901.0, i, cond_unet)
    ref = None
    if dtype == torch.float32:
        blocks = set(default_layers(pipe.cfg))
        store = ReferenceStore(lambda layer: block_of(layer.name) in blocks)
        model.set_hooks([store])
        ref, _ = reference_step(lambda latent, t, r: cond_unet(latent, t, slice(r, r + 1)), store, x, 901.0, i,
                                targets, 50,
                                config.max_iter_to_alter, config.thresholds, config.scale_factor,
                                config.max_refinement_steps)
    model.set_hooks([])
    pipe.model.float()
    return ours, ref, hook


def test_tiny_model_step_equals_reference(pipe):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    config = AttendExciteConfig(max_refinement_steps=2)      # step 0's threshold is not reached by a random model
    ours, ref, hook = tiny_step(pipe, x, 0, config)
    rec = hook.history[0]
    assert rec["tries"] == 2 and all(rec["gave_up"])
    assert hook._layers and all(block_of(n) in default_layers(pipe.cfg) for n in hook._layers)
    # the update is small on a random model: compare the updates, not just the latents
    torch.testing.assert_close(ours - x, ref - x, rtol=1e-3, atol=1e-6)
    assert (ours - x).abs().max() > 1e-4


def test_tiny_model_bfloat16(pipe):
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    f32, _, _ = tiny_step(pipe, x, 1, AttendExciteConfig())
    bf16, _, hook = tiny_step(pipe, x, 1, AttendExciteConfig(), dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert all(np.isfinite(hook.history[1]["loss_before"]))
    a, b = (f32 - x).flatten(), (bf16 - x).flatten()
    assert b.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99   # bf16 rounding, same direction


def test_pipeline_runs_the_hook_and_steps_after_max_iter_are_plain(pipe):
    targets = resolve_targets(pipe.tokenizer, PROMPT, ["circle", "square"])
    assert "attend-excite" in METHODS
    hook = make_editor("attend-excite", pipe, PROMPT, targets, steps=2, edit_steps=1)
    assert isinstance(hook, AttendExcite) and hook.config.max_iter_to_alter == 1 and hook.edit_steps == 1
    assert hook.targets == [t.positions for t in targets]
    wanted = []
    original = hook.wants
    hook.wants = lambda layer: wanted.append((hook.step, hook._collecting)) or original(layer)
    run = dict(steps=2, height=32, width=32, decode=False, return_latents=True, seed=5)
    edited = pipe(PROMPT, hooks=[hook], **run).latents
    plain = pipe(PROMPT, **run).latents
    assert list(hook.history) == [0]
    assert not torch.allclose(edited, plain)
    # the hook took the explicit path only in its own pass, only at step 0
    assert {s for s, collecting in wanted if collecting} == {0}
    with pytest.raises(TypeError, match="AttendExciteConfig"):
        make_editor("attend-excite", pipe, PROMPT, targets, steps=3, config=object())
