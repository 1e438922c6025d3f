"""python -m tools.bench launches [--family sd1] [--size 512] [--steps 50]

How many operations one UNet call runs, plain and with Attention Regulation, with the optimiser eager and compiled:
on a GPU each is a kernel launch, and a UNet at 512 px in half precision is launch-bound enough that these counts
predict the overhead the GPU will show. Counted on the meta device (shapes only: no weights, no GPU, seconds), one
UNet call of a CFG batch (2 images) at a regulated step, the default layers and the methods' prompt of
tools.gpu_check. View ops (reshape, transpose, ...) launch nothing and are not counted. The compiled descent
(RegulationConfig(compile=True), one CUDA graph) counts as one replay, one copy per tensor input into the graph's
static memory and one per output back out (optimise_weights clones them): on CUDA that is what runs.
The predicted overhead of a whole run assumes every op costs the same, with --edit-steps of --steps regulated
(the paper's 25 of 50) and the decoder left out; tools.gpu_check measures the real one.
"""
import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PROMPT, TARGETS = "a black cat and a white dog", ["cat", "dog"]   # tools.gpu_check's methods' prompt
VIEWS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "alias", "detach", "t", "transpose",
         "permute", "expand", "unsqueeze", "squeeze", "select", "slice", "split", "unbind", "chunk"}


class Ops(TorchDispatchMode):
    """Counts the ops that reach the dispatcher, views aside."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEWS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count(family="sd1", size=512, dtype=torch.float16, tokens=77):
    """{plain, eager, compiled, descents, descent_ops}: ops of one UNet call (batch 2) at a regulated step, the
    model in `dtype` (half precision casts to float32 and back in the norms and the regulated logits count)."""
    from minisd.checkpoint import new_model
    from minisd.config import FAMILIES
    from minisd.pipeline import Pipeline
    from regulation import attention_regulation as ar
    from regulation.editors import choose_targets, make_editor

    cfg = FAMILIES[family]()
    if cfg.is_sd3:
        raise SystemExit(f"error: {family} is an MMDiT; this counts a UNet's launches")
    with torch.device("meta"):
        model = new_model(cfg).to(dtype).eval().requires_grad_(False)
    pipe = Pipeline(model)
    targets = choose_targets(pipe.tokenizer, PROMPT, TARGETS, log=lambda *a: None)
    side = size // cfg.vae.downsample
    x = torch.empty(2, cfg.unet.in_channels, side, side, device="meta", dtype=dtype)
    t = torch.empty(2, dtype=torch.long, device="meta")
    ctx = torch.empty(2, tokens, cfg.unet.context_dim, device="meta", dtype=dtype)
    y = torch.empty(2, cfg.unet.adm_in_channels, device="meta", dtype=dtype) if cfg.unet.adm_in_channels else None
    editor = make_editor("regulate", pipe, PROMPT, targets, 50, seed=0)

    def call(hooks, step):
        for h in hooks:
            h.begin_step(step, slice(1, 2))
        model.set_hooks(hooks)
        try:
            with torch.no_grad():
                model.unet(x, t, ctx, y)
        finally:
            model.set_hooks([])

    call([], 0), call([editor], 0)   # the first step makes the cached constants
    with Ops() as plain:
        call([], 1)
    inner, graph, real = Ops(), [0, 0], ar._descend

    def descend(*args):
        with inner:
            out = real(*args)
        graph[0] += 1
        graph[1] += 1 + sum(isinstance(a, torch.Tensor) for a in args) + len(out)
        return out

    ar._descend = descend
    try:
        with Ops() as regulated:   # the inner mode's ops reach this one too
            call([editor], 1)
    finally:
        ar._descend = real
    return dict(plain=plain.count, eager=regulated.count, compiled=regulated.count - inner.count + graph[1],
                descents=graph[0], descent_ops=inner.count)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench launches", description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="sd1", help="a UNet family of minisd.config.FAMILIES (default: sd1)")
    ap.add_argument("--size", type=int, default=512, help="pixels")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--edit-steps", type=int, default=None, help="regulated steps (default: the paper's half)")
    args = ap.parse_args(argv)
    from regulation.attention_regulation import default_edit_steps
    edit = args.edit_steps if args.edit_steps is not None else default_edit_steps(args.steps)
    c = count(args.family, args.size, getattr(torch, args.dtype))
    print(f"ops of one UNet call (CFG batch 2), {args.family}, {args.size} px, {args.dtype}, at a regulated step; "
          f"{c['descents']} regulated layers, {c['descent_ops'] // max(c['descents'], 1)} ops in each eager descent")
    print(f"\n| UNet call | ops | over plain | predicted overhead of a {args.steps}-step run, "
          f"{edit} steps regulated |\n|---|---|---|---|")
    out = dict(c)
    for name in ("plain", "eager", "compiled"):
        extra = c[name] - c["plain"]
        run = edit * extra / (args.steps * c["plain"])
        out[f"{name} run"] = run
        label = {"plain": "plain", "eager": "regulated, eager optimiser",
                 "compiled": "regulated, compiled optimiser"}[name]
        print(f"| {label} | {c[name]} | {extra:+d} ({100 * extra / c['plain']:+.0f}%) | {100 * run:+.0f}% |")
    return out


if __name__ == "__main__":
    main()
