"""The fast path: minisd's own UNet under torch.compile, with the attention hooks still working.

    unet = compile_unet(model.unet, backend="inductor")    # or "openvino" (pip install -e ".[openvino]"), "eager"

What it does, and why:
  - The whole UNet is one compiled graph (no graph breaks), with inductor's freezing on: the weights become
    constants, so convolutions and Linear layers run on prepacked oneDNN weights and elementwise ops fuse into
    them. That is where the CPU speed-up comes from (plain inductor without freezing gains little).
  - Every attention core (`Attention.attend`: softmax(q k^T) v) is one opaque operator in that graph,
    `minisd::attend`, whose body runs eagerly: it asks the hooks which layers they want and takes the SDPA or the
    explicit float32 path, exactly as in eager mode. The compiler sees only tensors in and a tensor out, so hook
    state (step index, which layers, maps being recorded) is never a guard and never forces a recompile.
  - Passes with gradient (Attend-and-Excite's conditional pass) run the eager UNet: their hooks keep the maps'
    autograd graph, which an opaque operator would cut.
  - The timestep always reaches the compiled graph as a tensor, so its value is not specialised on either.
A new input shape (another image size or batch) compiles once more; nothing else does.
"""
import time

import torch

from .attention import Attention

BACKENDS = ("eager", "inductor", "openvino")
# torch's own debugging backends trace and check the graph without generating code: the tests' cheap path
_TEST_BACKENDS = ("aot_eager",)

_layers = []   # Attention modules by index: the opaque operator takes the index, not the module


@torch.library.custom_op("minisd::attend", mutates_args=())
def _attend_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, h: int, w: int) -> torch.Tensor:
    attn = _layers[layer]
    # the map size, for the hooks: Attention.forward's own `self.hw = hw` is replayed only after the graph has run
    attn.hw = None if h < 0 else (h, w)
    # (b, heads, n, d) -> contiguous (b, n, heads, d): one fixed layout the compiler can rely on, and the one the
    # output projection reads without another copy
    return Attention.attend(attn, q, k, v).transpose(1, 2).contiguous()


@_attend_op.register_fake
def _(q, k, v, layer, h, w):
    b, heads, n, _ = q.shape
    return q.new_empty((b, n, heads, v.shape[-1]), dtype=v.dtype)


def _routed_attend(attn, index):
    def attend(q, k, v):
        if torch.is_grad_enabled():   # evaluated while tracing too: compiled graphs only ever see no-grad mode
            return Attention.attend(attn, q, k, v)
        h, w = attn.hw or (-1, -1)   # plain ints while tracing (the shapes are static)
        return _attend_op(q, k, v, index, h, w).transpose(1, 2)
    return attend


def compile_unet(unet, backend="inductor", mode=None, log=print):
    """Make `unet` (minisd.unet.UNet) run compiled from its next call on, in place; returns it. The first call per
    input shape pays the compile cost, which the wrapper logs once. backend "eager" leaves the UNet as it is."""
    if backend not in BACKENDS + _TEST_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "eager" or getattr(unet, "compiled_backend", None) == backend:
        return unet
    if getattr(unet, "compiled_backend", None):
        raise ValueError(f"this UNet is already compiled with {unet.compiled_backend}")
    options = None
    if backend == "inductor":
        # freezing: weights become constants -> prepacked oneDNN convolutions/GEMMs, weight layouts chosen once
        options = {"freezing": True}
        if mode:
            options["max_autotune"] = "max-autotune" in mode
    elif backend == "openvino":
        try:
            import openvino.torch  # noqa: F401  (registers the "openvino" backend)
        except ImportError:
            raise ImportError("backend 'openvino' needs the openvino package: pip install -e '.[openvino]'") from None
        # aot_autograd: OpenVINO 2026.4's default path re-traces the graph with make_fx in fake mode, whose new
        # shape symbols break dynamo's guards under torch 2.13 ("sources must not be empty for symbol s7", even
        # for two convolutions); through aot_autograd it receives the graph dynamo already traced
        options = {"device": "CPU", "aot_autograd": True}
        if next(unet.parameters()).dtype == torch.float32:
            # OpenVINO runs float32 models in bfloat16 where the CPU has it unless told otherwise
            options["config"] = {"INFERENCE_PRECISION_HINT": "f32"}
    for m in unet.modules():
        if isinstance(m, Attention):
            _layers.append(m)
            m.attend = _routed_attend(m, len(_layers) - 1)
    eager = unet.forward
    compiled = torch.compile(eager, backend=backend, dynamic=False, fullgraph=backend == "inductor",
                             options=options)
    if backend == "openvino":
        # OpenVINO hands back its output buffer, which its next call overwrites: a sampler that keeps earlier
        # outputs (DPM-Solver++ 2M) would silently read the newer one. A copy costs microseconds next to a call.
        run = compiled
        compiled = lambda *a: run(*a).clone()
    seen = set()

    def forward(x, t, context, y=None):
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if torch.is_grad_enabled():
            return eager(x, t, context, y)
        # y: SDXL's vector conditioning, None for SD 1/2 (a constant to the compiler: no guard churn either way)
        key = (tuple(x.shape), x.dtype, t.dtype, tuple(context.shape), context.dtype, x.device,
               None if y is None else (tuple(y.shape), y.dtype))
        if key in seen:
            return compiled(x, t, context, y)
        start = time.perf_counter()
        out = compiled(x, t, context, y)
        unet.compile_seconds = getattr(unet, "compile_seconds", 0.0) + time.perf_counter() - start
        seen.add(key)
        if log:
            log(f"compiled the UNet with {backend} for input {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} "
                f"in {time.perf_counter() - start:.1f} s (once per shape)")
        return out

    # forward_eager: the same module uncompiled (benchmarks time both on one copy of the weights)
    unet.forward, unet.forward_eager, unet.compiled_backend = forward, eager, backend
    return unet
