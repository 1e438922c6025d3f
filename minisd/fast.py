"""The fast path: minisd's own UNet under torch.compile, with the attention hooks still working.

    unet = compile_unet(model.unet, backend="inductor")    # or "openvino" (pip install -e ".[openvino]"), "eager"

What it does, and why:
  - The whole UNet is one compiled graph (no graph breaks), with inductor's freezing on: the weights become
    constants, so convolutions and Linear layers run on prepacked oneDNN weights and elementwise ops fuse into
    them. That is where the CPU speed-up comes from (plain inductor without freezing gains little).
  - Every cross-attention core (`Attention.attend`: softmax(q k^T) v) is one opaque operator in that graph,
    `minisd::attend`, whose body runs eagerly: it asks the hooks which layers they want and takes the SDPA or the
    explicit float32 path, exactly as in eager mode. The compiler sees only tensors in and a tensor out, so hook
    state (step index, which layers, maps being recorded) is never a guard and never forces a recompile.
    Self-attention, which no hook of minisd's wants, stays inside the graph; a hook that wants it is refused.
  - backend "openvino": the graph is cut at the opaque operators and each stretch between them is converted with
    `openvino.convert_model`, the weights baked in as constants (as freezing does for inductor). A bfloat16 UNet's
    stretches are converted from float32 and run under OpenVINO's bf16 hint, bfloat16 in and out.
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


def _routed_attend(attn, index=None):
    """index: the cross-attention layer's place in _layers; None for self-attention, which stays in the graph."""
    def attend(q, k, v):
        if torch.is_grad_enabled():   # evaluated while tracing too: compiled graphs only ever see no-grad mode
            return Attention.attend(attn, q, k, v)
        if index is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        h, w = attn.hw or (-1, -1)   # plain ints while tracing (the shapes are static)
        return _attend_op(q, k, v, index, h, w).transpose(1, 2)
    return attend


def _openvino_backend(unet):
    """A torch.compile backend that cuts dynamo's graph of `unet` at its cross-attention cores and hands each stretch
    in between to OpenVINO with the weights as constants.

    Why not OpenVINO's own torch.compile backend: there the weights reach OpenVINO as graph inputs (dynamo lifts
    them), so it can neither fold them nor prepack them for its convolution and GEMM kernels; that path ran at
    about twice the time of the same UNet converted with `openvino.convert_model`, which bakes them in. Here the
    weights are frozen as inductor's freezing does: changing the UNet's weights in place after the first call (per
    input shape) is not seen; load them before compiling. The cross-attention cores (`minisd::attend`) stay in PyTorch,
    so the hooks run in them exactly as in eager mode."""
    try:
        import openvino as ov
    except ImportError:
        raise ImportError("backend 'openvino' needs the openvino package: pip install -e '.[openvino]'") from None
    from torch.fx.passes.split_module import split_module
    core = ov.Core()
    # OpenVINO runs float32 models in bfloat16 where the CPU has it unless told otherwise
    dtype = next(unet.parameters()).dtype
    config = {"INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    weights = {id(w) for w in (*unet.parameters(), *unet.buffers())}

    def backend(gm, example_inputs):
        # each cross-attention core alone in its partition, the stretches between them numbered in order
        part, n = {}, 0
        for node in gm.graph.nodes:
            if node.target is torch.ops.minisd.attend.default:
                part[node], n = n + 1, n + 2
            else:
                part[node] = n
        split = split_module(gm, None, lambda node: part[node])
        for name, seg in list(split.named_children()):
            if not any(node.target is torch.ops.minisd.attend.default for node in seg.graph.nodes):
                setattr(split, name, _OpenVINOSegment(seg, weights, core, config))
        return split
    return backend


class _OpenVINOSegment(torch.nn.Module):
    """One stretch of the UNet's graph between cross-attention cores, converted to OpenVINO at its first call (when its
    inputs are known): the inputs that are the UNet's weights become constants, the others stay inputs."""

    def __init__(self, seg, weights, core, config):
        super().__init__()
        self.seg, self.weights, self.core, self.config = seg, weights, core, config
        self.request = None

    def _convert(self, args):
        import openvino as ov
        self.frozen = {i for i, a in enumerate(args) if id(a) in self.weights}
        seg, frozen = self.seg, self.frozen
        # A bfloat16 stretch is traced in float32 and run under the bf16 hint, its inputs and outputs still bfloat16:
        # OpenVINO's own bf16 kernels are faster from a float32 graph than from one traced in bfloat16.
        bf16 = any(a.dtype == torch.bfloat16 for a in args)
        if bf16:
            for node in seg.graph.nodes:   # the graph's own casts (`.to(x.dtype)`) follow
                node.args, node.kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), _f32)
            seg.recompile()
        consts = [a.float() if a.dtype == torch.bfloat16 else a for a in args]
        live = [i for i in range(len(args)) if i not in frozen]
        inputs = tuple(consts[i] for i in live)

        class Frozen(torch.nn.Module):
            def forward(self, *inputs):
                it = iter(inputs)
                # tensors that reach the trace other than as its inputs become constants of the traced graph
                return seg(*(a if i in frozen else next(it) for i, a in enumerate(consts)))
        with torch.no_grad():
            # check_trace would run the segment twice more to compare: nothing here depends on the values
            traced = torch.jit.trace(Frozen(), inputs, check_trace=False)
            model = ov.convert_model(traced, example_input=inputs)
        del consts, inputs, traced
        outs = next(n for n in seg.graph.nodes if n.op == "output").args[0]
        self.single = not isinstance(outs, tuple)
        self.dtypes = [n.meta["example_value"].dtype for n in ((outs,) if self.single else outs)]
        if bf16:
            ppp = ov.preprocess.PrePostProcessor(model)
            for j, i in enumerate(live):
                if args[i].dtype == torch.bfloat16:
                    ppp.input(j).tensor().set_element_type(ov.Type.bf16)
            for j, dtype in enumerate(self.dtypes):
                if dtype == torch.bfloat16:
                    ppp.output(j).tensor().set_element_type(ov.Type.bf16)
            model = ppp.build()
        self.request = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        del self.seg   # its graph takes the weights as inputs; OpenVINO holds its own copy now

    def forward(self, *args):
        if self.request is None:
            self._convert(args)
        self.request.infer([_ov_tensor(a) for i, a in enumerate(args) if i not in self.frozen], share_inputs=True,
                           share_outputs=True)
        # OpenVINO's own output buffers, valid until this segment's next call (the UNet's output is copied)
        outs = [torch.from_numpy(self.request.get_output_tensor(i).data).view(dtype)
                for i, dtype in enumerate(self.dtypes)]
        return outs[0] if self.single else tuple(outs)


def _f32(a):
    return torch.float32 if a is torch.bfloat16 else a


def _ov_tensor(t):
    import openvino as ov
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:   # numpy has no bfloat16: hand OpenVINO the bits
        return ov.Tensor(t.view(torch.int16).numpy(), list(t.shape), ov.Type.bf16)
    return ov.Tensor(t.numpy(), shared_memory=True)


def compile_unet(unet, backend="inductor", mode=None, log=print):
    """Make `unet` (minisd.unet.UNet) run compiled from its next call on, in place; returns it. The first call per
    input shape pays the compile cost, which the wrapper logs once. backend "eager" leaves the UNet as it is."""
    if backend not in BACKENDS + _TEST_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "eager" or getattr(unet, "compiled_backend", None) == backend:
        return unet
    if getattr(unet, "compiled_backend", None):
        raise ValueError(f"this UNet is already compiled with {unet.compiled_backend}")
    compiler, options = backend, None
    if backend == "inductor":
        # freezing: weights become constants -> prepacked oneDNN convolutions/GEMMs, weight layouts chosen once
        options = {"freezing": True}
        if mode:
            options["max_autotune"] = "max-autotune" in mode
    elif backend == "openvino":
        compiler = _openvino_backend(unet)
    selfs = []
    for m in unet.modules():
        if isinstance(m, Attention) and m.is_cross:
            _layers.append(m)
            m.attend = _routed_attend(m, len(_layers) - 1)
        elif isinstance(m, Attention):
            # self-attention stays inside the graph (the compiler's own SDPA): 17 fewer cuts in SD 1.5's graph, and
            # every hook minisd has wants cross-attention only; a hook that wants a self-attention layer is refused
            m.attend = _routed_attend(m)
            selfs.append(m)
    eager = unet.forward
    # one graph for the real backends; the test backend lets an error raised in the UNet reach the caller as it is
    compiled = torch.compile(eager, backend=compiler, dynamic=False, fullgraph=backend != "aot_eager",
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
        hooks = selfs[0].hooks if selfs else []
        wanted = [m.name for m in selfs for h in hooks if h.wants(m)]
        if wanted:
            raise ValueError(f"a hook wants self-attention layers ({', '.join(wanted[:3])} ...): on the compiled "
                             f"UNet only cross-attention runs the hooks; use the eager backend for these")
        # y: SDXL's vector conditioning, None for SD 1/2 (a constant to the compiler: no guard churn either way)
        key = (tuple(x.shape), x.dtype, t.dtype, tuple(context.shape), context.dtype, x.device,
               None if y is None else (tuple(y.shape), y.dtype))
        if key in seen:
            return compiled(x, t, context, y)
        start = time.perf_counter()
        out = compiled(x, t, context, y)
        seen.add(key)
        if log:
            log(f"compiled the UNet with {backend} for input {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} "
                f"in {time.perf_counter() - start:.1f} s (once per shape)")
        return out

    unet.forward, unet.compiled_backend = forward, backend
    return unet
