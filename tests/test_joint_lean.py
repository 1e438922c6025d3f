"""SD 3's hooked joint attention in O(image x text) memory (minisd/attention.py: hooked_joint_attention) equals the
whole-square explicit path (tools/bench/joint.py: explicit_joint_attention) for Attention Regulation, Attend-and-
Excite and the maps of --save-attention, in float64 and in float32; the image keys may be folded in chunks of any
size; a hook that does not understand joint attention sees a UNet's cross-attention map."""
import pytest
import torch

import minisd.attention
import minisd.mmdit
from minisd.attention import AttentionHook
from minisd.checkpoint import build_model
from minisd.config import tiny_sd3
from minisd.maps import AttentionMaps
from regulation.attend_excite import AttendExciteConfig, JointAttendExcite
from tools.bench.joint import explicit_joint_attention, regulation_hook

TEXT = 30    # text tokens: the MMDiT takes any number


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_sd3(True), seed=0).eval()


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = tiny_sd3(True).mmdit
    # 8 x 12 latent: 4 x 6 patches; the second image is the conditional half
    x = torch.randn(2, 16, 8, 12, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, TEXT, m.context_dim, generator=g, dtype=torch.float64)
    y = torch.randn(2, m.adm_in_channels, generator=g, dtype=torch.float64)
    return x.to(dtype), torch.tensor([700.0, 700.0]), y.to(dtype), ctx.to(dtype)


def run(model, dtype, make_hooks, explicit, monkeypatch, then=None):
    """One MMDiT call in `dtype` with the hooks `make_hooks()` gives, on the lean or the explicit path; `then(hooks,
    mmdit, inputs)` runs instead of the plain call when given (Attend-and-Excite's pass with gradient)."""
    mmdit = model.mmdit.to(dtype)
    with monkeypatch.context() as mp:
        if explicit:
            mp.setattr(minisd.mmdit, "hooked_joint_attention", explicit_joint_attention)
        hooks = make_hooks()
        model.set_hooks(hooks)
        try:
            x, t, y, ctx = inputs(dtype)
            if then is not None:
                return then(hooks, mmdit, (x, t, y, ctx))
            with torch.no_grad():
                return mmdit(x, t, y=y, context=ctx), hooks
        finally:
            model.set_hooks([])
            model.mmdit.float()


def regulated(model, dtype, explicit, monkeypatch):
    out, (hook,) = run(model, dtype, lambda: [regulation_hook(TEXT, slice(1, 2), targets=(2, 5, 23),
                                                              specials=(0, 7, 26))], explicit, monkeypatch)
    return out, hook.loss_table()


def observed(model, dtype, explicit, monkeypatch):
    def hooks():
        maps = AttentionMaps([2, 5, 23], steps=[0], blocks=lambda layer: True)
        maps.begin_step(0, slice(1, 2))
        return [maps]
    out, (maps,) = run(model, dtype, hooks, explicit, monkeypatch)
    return out, maps.result()[0]


def excited(model, dtype, explicit, monkeypatch):
    def loss_and_grad(hooks, mmdit, inputs):
        x, t, y, ctx = inputs
        hook = hooks[0]
        return hook.loss_and_grad(x[1:], t[1:], lambda x, t: mmdit(x.to(dtype), t, y=y[1:], context=ctx[1:]))
    make = lambda: [JointAttendExcite([[2], [5, 6]], 4, AttendExciteConfig(), select=lambda layer: True)]
    return run(model, dtype, make, explicit, monkeypatch, then=loss_and_grad)


def biggest_gap(a, b):
    if isinstance(a, dict):
        return max(biggest_gap(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return max(biggest_gap(x, y) for x, y in zip(a, b))
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


# Attend-and-Excite's loss runs in float32 whatever the model's dtype: in float64 its gradient agrees to float32's
# rounding, the others to float64's
@pytest.mark.parametrize("method, tol64", [(regulated, 1e-10), (observed, 1e-10),
                                           (excited, torch.finfo(torch.float32).eps)],
                         ids=["regulate", "save-attention", "attend-excite"])
def test_lean_path_equals_the_whole_square(model, method, tol64, monkeypatch):
    """float64: equal to rounding. float32: within a few times the float32 rounding of the explicit path itself
    (its distance from its own float64 run), the noise floor of this comparison."""
    lean64, square64 = (method(model, torch.float64, e, monkeypatch) for e in (False, True))
    assert biggest_gap(lean64, square64) < tol64
    lean32, square32 = (method(model, torch.float32, e, monkeypatch) for e in (False, True))
    floor = biggest_gap(square32, square64)
    assert 0 < floor < 1e-4
    assert biggest_gap(lean32, square32) < 4 * floor + 1e-6


def test_the_edit_changes_the_output(model, monkeypatch):
    plain, _ = run(model, torch.float64, lambda: [], False, monkeypatch)
    edited, _ = regulated(model, torch.float64, False, monkeypatch)
    assert (edited[1] - plain[1]).abs().max() > 1e-6, "the regulated image did not change"
    assert (edited[0] - plain[0]).abs().max() < 1e-12, "the unconditional half must not change"


def test_any_chunk_of_image_rows_gives_the_same(model, monkeypatch):
    """With and without gradient (Attend-and-Excite's pass recomputes each chunk in the backward pass)."""
    whole, (loss, grad) = regulated(model, torch.float64, False, monkeypatch)[0], \
        excited(model, torch.float64, False, monkeypatch)
    monkeypatch.setattr(minisd.attention, "FOLD_CHUNK", 7)   # one image row per chunk
    chunked, (chunked_loss, chunked_grad) = regulated(model, torch.float64, False, monkeypatch)[0], \
        excited(model, torch.float64, False, monkeypatch)
    assert (whole - chunked).abs().max() < 1e-12
    # the loss and its gradient run in float32 (Attend-and-Excite's rule): equal to float32's rounding
    eps = torch.finfo(torch.float32).eps
    assert (loss - chunked_loss).abs().max() <= 4 * eps
    assert (grad - chunked_grad).abs().max() <= 8 * eps * grad.abs().max()


class Shift(AttentionHook):
    """Adds 2 to the logits of text key 3 and records what it is shown."""

    def __init__(self, joint):
        self.understands_joint, self.seen = joint, []

    def wants(self, layer):
        return True

    def edit_logits(self, layer, logits):
        self.seen.append(tuple(logits.shape))
        out = logits.clone()
        out[..., 3] += 2
        return out

    def edit_probs(self, layer, logits, probs):
        self.seen.append(probs.sum(-1))
        return probs


def test_a_hook_that_does_not_know_joint_attention_sees_a_cross_attention_map(model, monkeypatch):
    unaware, (seen_unaware,) = run(model, torch.float64, lambda: [Shift(False)], False, monkeypatch)
    aware, (seen_aware,) = run(model, torch.float64, lambda: [Shift(True)], False, monkeypatch)
    assert (unaware - aware).abs().max() < 1e-12, "the same edit of a text column gives the same output"
    image, heads = 4 * 6, model.cfg.mmdit.num_heads
    assert seen_unaware.seen[0] == (2, heads, image, TEXT)          # image queries x text keys
    assert seen_aware.seen[0] == (2, heads, image, TEXT + 1)        # ... and one column for every image key
    for sums in seen_unaware.seen[1::2] + seen_aware.seen[1::2]:
        assert torch.allclose(sums, torch.ones_like(sums))          # renormalised over text; the joint rows
    plain, _ = run(model, torch.float64, lambda: [], False, monkeypatch)
    assert (aware - plain).abs().max() > 1e-6, "the edit changed nothing"
