"""The fast path (minisd/fast.py): the compiled UNet gives the eager UNet's outputs, and attention hooks work on it
(observers see the same maps, Attention Regulation edits the same layers the same way) with no recompile as the
hooks' state changes from step to step.

The default run checks it with torch's `aot_eager` backend (dynamo and AOTAutograd trace the whole UNet into one
graph with the opaque attention operator, as for inductor, but generate no code: seconds). The `slow` tests do the
same with inductor (freezing on) and a whole regulated generation through `Pipeline.compile`.
"""
import pytest
import torch

from minisd.checkpoint import build_model
from minisd.config import tiny
from minisd.fast import compile_unet
from minisd.maps import AttentionMaps
from minisd.pipeline import Pipeline

TOL_EXACT = 1e-6     # aot_eager runs the same kernels as eager
TOL_INDUCTOR = 1e-4  # inductor fuses and reorders float32 arithmetic


def _model():
    return build_model(tiny(), seed=3).eval().requires_grad_(False)


def _inputs(cfg, px=64):
    g = torch.Generator().manual_seed(0)
    side = px // cfg.vae.downsample
    return (torch.randn(2, cfg.unet.in_channels, side, side, generator=g), torch.tensor([700, 700]),
            torch.randn(2, 77, cfg.unet.context_dim, generator=g))


def _regulation(model):
    from regulation.attention_regulation import AttentionRegulation
    return AttentionRegulation([2, 5], 8, num_steps=6, model_config=model.cfg, generator=0)


def _steps(model, inputs, steps=4):
    """Per step: the UNet's output with an observer and a regulating editor on; then the maps. Step 3 is past the
    editor's edit_steps (3 of 6), so the run crosses from regulated to plain calls."""
    maps = AttentionMaps([2, 5], steps=range(steps), blocks=model.cfg.default_blocks())
    editor = _regulation(model)
    outs = []
    model.set_hooks([editor, maps])
    try:
        with torch.no_grad():
            for step in range(steps):
                for h in (editor, maps):
                    h.begin_step(step, slice(1, 2))
                outs.append(model.unet(*inputs))
    finally:
        model.set_hooks([])
    return outs, maps.result(), editor.loss_table()


def _check_hooks_on_fast_path(backend, tol):
    import torch._dynamo.utils as dynamo_utils
    eager, fast = _model(), _model()
    inputs = _inputs(eager.cfg)
    want_outs, want_maps, want_losses = _steps(eager, inputs)
    compile_unet(fast.unet, backend, log=None)
    dynamo_utils.counters.clear()
    got_outs, got_maps, got_losses = _steps(fast, inputs)
    # one graph for the whole UNet, compiled once: hook state (step, which layers, the records) is no guard
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1, dict(dynamo_utils.counters["stats"])
    assert not dynamo_utils.counters["recompiles"], dict(dynamo_utils.counters["recompiles"])
    assert sorted(got_maps) == sorted(want_maps) == [0, 1, 2, 3]
    for step in want_maps:
        assert (got_maps[step] - want_maps[step]).abs().max() < tol
    for a, b in zip(got_outs, want_outs):
        assert (a - b).abs().max() < tol
    assert (want_outs[0] - _plain(eager, inputs)).abs().max() > 100 * tol   # regulation changed the output
    assert got_losses.keys() == want_losses.keys() and len(want_losses) > 0
    # past the editor's steps only the observer is on: the call equals a plain one (up to the observed layers'
    # explicit float32 softmax against SDPA's)
    assert (got_outs[3] - _plain(eager, inputs)).abs().max() < 1e-5


def _plain(model, inputs):
    with torch.no_grad():
        return model.unet(*inputs)


def test_hooks_work_on_the_compiled_unet():
    _check_hooks_on_fast_path("aot_eager", TOL_EXACT)


def test_grad_passes_take_the_eager_path():
    """Attend-and-Excite differentiates its maps through the UNet: with gradient on, the compiled UNet runs eagerly
    and the maps an observer collects keep their autograd graph."""
    model = _model()
    compile_unet(model.unet, "aot_eager", log=None)
    x, t, ctx = _inputs(model.cfg)
    x = x[:1].clone().requires_grad_(True)
    seen = []

    class Grab(AttentionMaps):
        def wants(self, layer):
            return layer.is_cross

        def edit_probs(self, layer, logits, probs):
            seen.append(probs)
            return probs

    model.set_hooks([Grab([2], [0], [])])
    try:
        with torch.enable_grad():
            model.unet(x, t[:1], ctx[:1])
    finally:
        model.set_hooks([])
    assert seen and all(p.requires_grad for p in seen)
    torch.stack([p[..., 2].mean() for p in seen]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_compiled_sdxl_unet_takes_the_vector():
    """SDXL's UNet takes the vector conditioning y; the compiled forward passes it through (and a call without it
    fails as in eager mode)."""
    from minisd.config import tiny_sdxl
    eager = build_model(tiny_sdxl(), seed=3).eval().requires_grad_(False)
    fast = build_model(tiny_sdxl(), seed=3).eval().requires_grad_(False)
    x, t, ctx = _inputs(eager.cfg)
    y = torch.randn(2, eager.cfg.unet.adm_in_channels, generator=torch.Generator().manual_seed(1))
    compile_unet(fast.unet, "aot_eager", log=None)
    with torch.no_grad():
        want, got = eager.unet(x, t, ctx, y), fast.unet(x, t, ctx, y)
        assert (got - want).abs().max() < TOL_EXACT
        # y is an input of the compiled graph, not a constant baked in at the first call
        want2 = eager.unet(x, t, ctx, 2 * y)
        assert (want2 - want).abs().max() > 100 * TOL_EXACT
        assert (fast.unet(x, t, ctx, 2 * y) - want2).abs().max() < TOL_EXACT
        with pytest.raises(ValueError, match="needs the vector conditioning y"):
            fast.unet(x, t, ctx)


def test_backend_is_checked():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        compile_unet(_model().unet, "tensorrt")


def test_eager_backend_leaves_the_unet_alone():
    model = _model()
    forward = model.unet.forward
    assert Pipeline(model).compile("eager").model.unet.forward == forward


def test_hooks_work_on_openvino():
    """The openvino backend: the stretches of the graph between the opaque cross-attention operators run as
    OpenVINO models with the weights baked in, the operators in PyTorch, so the hooks run as on the other paths
    (float32, OpenVINO told to keep f32)."""
    pytest.importorskip("openvino", reason="the openvino backend needs the openvino package (pip install -e '.[test]')")
    # the earlier tests' compiled UNets hold entries in dynamo's cache for UNet.forward's code; past its recompile
    # limit dynamo would compile the submodules one by one instead of one graph
    torch._dynamo.reset()
    try:
        _check_hooks_on_fast_path("openvino", TOL_INDUCTOR)
        # an output stays what it was after the next call (OpenVINO reuses its output buffer)
        model = _model()
        x, t, ctx = _inputs(model.cfg)
        want = _plain(model, (x, t, ctx))
        compile_unet(model.unet, "openvino", log=None)
        with torch.no_grad():
            first = model.unet(x, t, ctx)
            model.unet(2 * x, t, ctx)
        assert (first - want).abs().max() < TOL_INDUCTOR
    finally:
        torch._dynamo.reset()


def test_openvino_in_bfloat16():
    """A bfloat16 UNet on the openvino backend: its stretches are traced in float32 and run under OpenVINO's bf16
    hint, taking and giving bfloat16 tensors. Its output is bfloat16 and as near the float32 model's as eager
    bfloat16's is (bfloat16 keeps 8 bits: a relative error of a few 1e-2 is its rounding; reading the bits wrongly
    would be far off), and a regulated call still edits."""
    pytest.importorskip("openvino", reason="the openvino backend needs the openvino package (pip install -e '.[test]')")
    torch._dynamo.reset()
    try:
        model = _model()
        inputs = _inputs(model.cfg)
        want = _plain(model, inputs)
        model = model.to(torch.bfloat16)
        bf16 = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in inputs)
        eager = _plain(model, bf16)
        compile_unet(model.unet, "openvino", log=None)
        got = _plain(model, bf16)
        rel = lambda a: ((a.float() - want).abs().max() / want.abs().max()).item()
        assert got.dtype == torch.bfloat16
        assert rel(got) < max(0.1, 3 * rel(eager)), (rel(got), rel(eager))
        model.set_hooks([_regulation(model)])
        model.hooks[0].begin_step(0, slice(1, 2))
        try:
            regulated = _plain(model, bf16)
        finally:
            model.set_hooks([])
        assert (regulated.float() - got.float()).abs().max() > 1e-2
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_hooks_work_on_inductor():
    _check_hooks_on_fast_path("inductor", TOL_INDUCTOR)


@pytest.mark.slow
def test_regulated_generation_on_inductor_equals_eager():
    """A whole regulated generation through Pipeline.compile: the same image as eager (8-bit pixels within 1) and
    the same maps."""
    import numpy as np
    from regulation.editors import choose_targets, make_editor
    prompt = "a red circle and a blue square"
    runs = []
    for backend in ("eager", "inductor"):
        pipe = Pipeline(_model()).compile(backend)
        targets = choose_targets(pipe.tokenizer, prompt, ["circle", "square"], log=lambda *a: None)
        editor = make_editor("regulate", pipe, prompt, targets, steps=4, seed=0)
        maps = AttentionMaps([p for t in targets for p in t.positions], [0, 3], pipe.cfg.default_blocks())
        image = pipe(prompt, steps=4, seed=0, hooks=[editor, maps]).images[0]
        runs.append((np.asarray(image, dtype=np.int16), maps.result()))
    (a, ma), (b, mb) = runs
    assert np.abs(a - b).max() <= 1
    assert all((ma[s] - mb[s]).abs().max() < TOL_INDUCTOR for s in ma)


def test_a_hook_on_self_attention_is_refused_on_the_compiled_unet():
    """Self-attention runs inside the compiled graph (no hooks there): a hook that wants a self-attention layer gets
    a clear error naming it, not a silent miss; the same hook works on the eager UNet."""
    model = _model()
    x, t, ctx = _inputs(model.cfg)

    class SelfMaps(AttentionMaps):
        def wants(self, layer):
            return not layer.is_cross

        def edit_probs(self, layer, logits, probs):
            seen.append(layer.name)
            return probs

    seen = []
    model.set_hooks([SelfMaps([2], [0], [])])
    try:
        with torch.no_grad():
            model.unet(x, t, ctx)
        assert seen and all(".attn1" in name for name in seen)
        compile_unet(model.unet, "aot_eager", log=None)
        with torch.no_grad(), pytest.raises(ValueError, match=r"self-attention layers \(.*attn1"):
            model.unet(x, t, ctx)
    finally:
        model.set_hooks([])
