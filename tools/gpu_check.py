"""Does minisd run right, and fast, on a GPU? One short command that prints a markdown table and writes a JSON.

    python -m tools.gpu_check --json gpu_check.json                     # CUDA: SD 1.5 architecture, random weights
    python -m tools.gpu_check --json gpu_check.json --backend inductor  # also the compiled path (minisd/fast.py)
    python -m tools.gpu_check --json gpu_check.json --only overhead     # just the paper's overhead column, no diffusers
    python -m tools.gpu_check --device cpu --json /tmp/check.json       # the tiny model, seconds (the suite runs it)

Made for a GPU lent for a few minutes: the JSON is rewritten after every row, so a run stopped at its time limit
keeps what it measured; a row that raises (out of memory, a compiler that fails on this torch) is recorded under
"errors" and the rest still run; without diffusers installed, its rows are skipped and the reason recorded.

Parity, on --device against the CPU in float32 (the same weights and inputs, built on the CPU and moved):
  unet f32          minisd's UNet on the device vs on the CPU (max |diff| and relative to max |output|)
  unet f32 vs diffusers   minisd vs diffusers' UNet2DConditionModel, both on the device
  unet f16 / bf16   drift of half precision on the device vs float32 on the CPU
  regulated f32     a UNet call with Attention Regulation on, device vs CPU (the explicit attention path)
  maps f32          the attention maps an observer records, device vs CPU
  vae f32 vs diffusers    the decoder, minisd vs diffusers on the device
Speed, in --dtype (float16 by default on CUDA), medians of --runs after a warm-up:
  one UNet call (batch 2, --size px) minisd vs diffusers; a whole --steps generation (DPM-Solver++, guidance 7.5)
  minisd vs diffusers; a regulated generation (the default 5 layers, first half of the steps) vs a plain one;
  every method of the paper's table at its defaults, and Attention Regulation with its optimiser compiled
  (RegulationConfig(compile=True)), each against a plain generation of the same prompt: the paper's overhead column.
On CUDA the default is SD 1.5 at 512 px and 50 steps, a few minutes in all on a recent GPU (most of it building
random weights on the CPU); on --device cpu the tiny config at its own size and 4 steps.
"""
import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROMPT = "a photo of a cat and a dog on a sofa"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, runs, warm_up=True):
    if warm_up:
        fn()
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _diff(a, ref):
    a, ref = a.detach().float().cpu(), ref.detach().float().cpu()
    d = (a - ref).abs().max().item()
    return dict(max_abs=d, rel=d / max(ref.abs().max().item(), 1e-30), finite=bool(torch.isfinite(a).all()))


def _quiet(*args, **kwargs):
    pass


def build(family, seed=0, with_diffusers=True):
    """minisd's model (random weights) and diffusers' pipeline with the same tensors (None without it), both
    float32 on the CPU."""
    from minisd.checkpoint import build_model
    from minisd.config import FAMILIES
    from minisd.pipeline import Pipeline
    model = build_model(FAMILIES[family](), seed=seed).eval().requires_grad_(False)
    if not with_diffusers:
        return Pipeline(model), None
    from tools.bench.generate import diffusers_from_minisd
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    theirs = diffusers_from_minisd(model, Path(tmp) / "vocab")
    return Pipeline(model), theirs


class Results:
    """What the check has measured so far, written to `path` after every row: a run cut short keeps its rows."""

    def __init__(self, path, log, **head):
        self.path, self.log = Path(path), log
        self.data = dict(head, parity={}, speed={}, base={}, errors={}, skipped={})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self):
        self.path.write_text(json.dumps(self.data, indent=1))

    def run(self, section, name, fn, base=None):
        """fn() -> the row's value; an exception is recorded as the row's error and the check goes on. base: the
        speed row this one is a ratio to."""
        if base:
            self.data["base"][name] = base
        try:
            value = fn()
        except Exception as e:   # noqa: BLE001 - one failing row must not cost the rows after it
            self.data["errors"][name] = f"{type(e).__name__}: {e}"
            self.log(f"  {name}: FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            self.data[section][name] = value
            if section == "speed":
                self.log(f"  {name}: {value:.3f} s")
            else:
                self.log(f"  {name}: max |diff| {value['max_abs']:.2e} (rel {value['rel']:.2e})")
        self.save()

    def skip(self, what, why):
        self.data["skipped"][what] = why
        self.log(f"  skipped {what}: {why}")
        self.save()


def regulation_editor(pipe, steps):
    from regulation.editors import choose_targets, make_editor
    targets = choose_targets(pipe.tokenizer, PROMPT, ["cat", "dog"], log=_quiet)
    return make_editor("regulate", pipe, PROMPT, targets, steps, seed=0)


def parity(pipe, theirs, device, px, res):
    """Float32 on the CPU is the reference; the same call on `device` in each dtype against it."""
    from minisd.maps import AttentionMaps
    cfg, model = pipe.cfg, pipe.model
    g = torch.Generator().manual_seed(0)
    side = px // cfg.vae.downsample
    x = torch.randn(2, cfg.unet.in_channels, side, side, generator=g)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        context = pipe.encode_prompts(["", PROMPT])
    editor = lambda: regulation_editor(pipe, 50)   # a fresh one per call: its random draws start from its seed
    positions = [2, 5]
    blocks = cfg.default_blocks()

    def unet_call(hooks=(), step=0):
        dev, dtype = pipe.device, pipe.dtype
        for h in hooks:
            h.begin_step(step, slice(1, 2))
        model.set_hooks(hooks)
        try:
            with torch.no_grad():
                return model.unet(x.to(dev, dtype), t.to(dev), context.to(dev, dtype)).float().cpu()
        finally:
            model.set_hooks([])

    def observed():
        maps = AttentionMaps(positions, [0], blocks)
        unet_call([maps])
        return maps.result()[0]

    z = torch.randn(1, cfg.unet.in_channels, side, side, generator=g)
    ref = dict(unet=unet_call(), regulated=unet_call([editor()]), maps=observed())
    model.to(device)
    row = lambda name, fn: res.run("parity", name, fn)
    with torch.no_grad():
        row("unet f32 (device vs CPU)", lambda: _diff(unet_call(), ref["unet"]))
        if theirs is not None:
            theirs.to(device)
            dev_x, dev_t, dev_ctx = x.to(device), t.to(device), context.to(device)
            row("unet f32 (minisd vs diffusers, device)", lambda: _diff(
                unet_call(), theirs.unet(dev_x, dev_t, encoder_hidden_states=dev_ctx, return_dict=False)[0]))
        row("regulated f32 (device vs CPU)", lambda: _diff(unet_call([editor()]), ref["regulated"]))
        row("maps f32 (device vs CPU)", lambda: _diff(observed(), ref["maps"]))
        if theirs is not None:
            dz = z.to(device)
            row("vae f32 (minisd vs diffusers, device)", lambda: _diff(
                model.decode_latents(dz),
                ((theirs.vae.decode(dz / cfg.vae.scale_factor).sample + 1) / 2).clamp(0, 1)))
        for name in ("float16", "bfloat16"):
            if device.type == "cpu" and name == "float16":
                continue   # float16 convolutions are a GPU matter
            model.to(dtype=DTYPES[name])
            row(f"unet {name} drift (device vs CPU f32)", lambda: _diff(unet_call(), ref["unet"]))
            row(f"regulated {name} drift (device vs CPU f32)", lambda: _diff(unet_call([editor()]),
                                                                            ref["regulated"]))
            model.to(dtype=torch.float32)


def speed(pipe, theirs, device, dtype, px, steps, runs, backend, res, only, compiled):
    cfg, model = pipe.cfg, pipe.model
    model.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    side = px // cfg.vae.downsample
    x = torch.randn(2, cfg.unet.in_channels, side, side, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    with torch.no_grad():
        ctx = pipe.encode_prompts(["", PROMPT]).to(device, dtype)
    latents = torch.randn(1, cfg.unet.in_channels, side, side, generator=g)
    run = dict(steps=steps, guidance=7.5, height=px, width=px, sampler="dpmpp_2m")
    if only == "all":
        general(pipe, theirs, device, dtype, x, t, ctx, latents, run, runs, backend, res)
    methods(pipe, device, latents, run, runs, res, compiled)


def general(pipe, theirs, device, dtype, x, t, ctx, latents, run, runs, backend, res):
    """A UNet call and a plain generation against diffusers; a regulated generation and minisd's compiled path
    against minisd plain."""
    model, steps, px = pipe.model, run["steps"], run["height"]
    gen, dgen = f"{steps}-step generation, minisd", f"{steps}-step generation, diffusers"
    dcall = "unet call, diffusers" if theirs is not None else None
    dgen_base = dgen if theirs is not None else None
    row = lambda name, fn, base=None: res.run("speed", name, lambda: _median_time(fn, device, runs), base)

    def mine(regulated=False):
        hooks = [regulation_editor(pipe, steps)] if regulated else []
        with torch.inference_mode():
            pipe(PROMPT, latents=latents.clone(), hooks=hooks, decode=True, **run)

    with torch.inference_mode():
        row("unet call, minisd", lambda: model.unet(x, t, ctx), dcall)
        if theirs is not None:
            theirs.to(device=device, dtype=dtype)
            row(dcall, lambda: theirs.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0], dcall)
    row(gen, mine, dgen_base)
    if theirs is not None:
        def diffusers_run():
            with torch.inference_mode():
                theirs(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=px, width=px,
                       latents=latents.clone().to(device, dtype))
        row(dgen, diffusers_run, dgen)
    row(f"{gen} regulated", lambda: mine(True), gen)
    if backend != "eager":
        def compile_once():
            start = time.perf_counter()
            pipe.compile(backend)
            with torch.inference_mode():
                model.unet(x, t, ctx)
            _sync(device)
            return time.perf_counter() - start
        res.run("speed", f"compile ({backend}), one-time", compile_once)
        with torch.inference_mode():
            row(f"unet call, minisd {backend}", lambda: model.unet(x, t, ctx), dcall)
        row(f"{gen} {backend}", mine, gen)
        row(f"{gen} {backend} regulated", lambda: mine(True), gen)


METHOD_PROMPT = "a black cat and a white dog"   # modifiers for SynGen, two phrases for the layout and the concepts
LAYOUT = "black cat:0.05,0.1,0.5,0.9;white dog:0.5,0.1,0.95,0.9"


def methods(pipe, device, latents, run, runs, res, compiled):
    """Every method of the paper's table at its defaults, and Attention Regulation's optimiser compiled into one
    graph (RegulationConfig(compile=True): on CUDA one CUDA graph per layer and step), each a whole generation
    of METHOD_PROMPT from the same latents, plain first, so that each overhead is measured against a plain run
    of the same prompt in the same process."""
    from regulation.attention_regulation import RegulationConfig
    from regulation.editors import METHODS, choose_targets, make_editor, set_up
    steps = run["steps"]
    targets = choose_targets(pipe.tokenizer, METHOD_PROMPT, ["cat", "dog"], log=_quiet)

    def generate(method=None, optimiser_compiled=False):
        hooks, options, context = [], {}, None
        if optimiser_compiled:
            hooks = [make_editor("regulate", pipe, METHOD_PROMPT, targets, steps, seed=0,
                                 config=RegulationConfig(compile=True))]
        elif method:
            r = set_up(method, pipe, METHOD_PROMPT, steps, seed=0, log=_quiet, guidance=run["guidance"],
                       height=run["height"], width=run["width"],
                       targets=targets if METHODS[method].takes_words else None,
                       layout=LAYOUT if "layout" in METHODS[method].takes else None)
            hooks, options, context = r.hooks, r.options, r.context
        with context or contextlib.nullcontext():   # no inference_mode: A&E and SynGen take gradients
            pipe(METHOD_PROMPT, latents=latents.clone(), hooks=hooks, decode=True, **run, **options)

    plain = method_row(steps, None)
    res.run("speed", plain, lambda: _median_time(generate, device, runs), plain)
    for m in METHODS:
        res.run("speed", method_row(steps, m), lambda: _median_time(lambda: generate(m), device, runs), plain)
    if compiled:
        name = method_row(steps, "compiled")
        first = f"{name}, first run (compiles)"
        fn = lambda: generate(optimiser_compiled=True)
        res.run("speed", first, lambda: _median_time(fn, device, 1, warm_up=False))
        if first in res.data["speed"]:
            res.run("speed", name, lambda: _median_time(fn, device, runs, warm_up=False), plain)
        # More graphs than shapes mean recompiles (past dynamo's limit a call falls back to the eager loop);
        # inductor counts the CUDA graphs it skipped, and why.
        from torch._dynamo.utils import counters
        res.data["compiler counters"] = {k: dict(counters[k]) for k in ("stats", "inductor") if k in counters}
        res.save()


def method_row(steps, method):
    """The speed row of a method of the paper's table (None: plain on the methods' prompt; "compiled": Attention
    Regulation with its optimiser compiled)."""
    return (f"{steps}-step generation, minisd plain (methods' prompt)" if method is None else
            f"{steps}-step generation, minisd regulate compiled" if method == "compiled" else
            f"{steps}-step generation, minisd {method}")


def report(data, steps, json_path):
    """The three tables: parity, speed (each row against its base), and the paper's overhead column."""
    from regulation.editors import METHODS
    from tools.eval.paper_table import PAPER
    name, family, px, dname = data["device"], data["family"], data["px"], data["dtype"]
    par, spd, base = data["parity"], data["speed"], data["base"]
    if par:
        print(f"\n| parity on {name} ({family}, {min(px, 256)} px) | max abs diff | relative | finite |\n"
              "|---|---|---|---|")
        for k, v in par.items():
            print(f"| {k} | {v['max_abs']:.2e} | {v['rel']:.2e} | {v['finite']} |")
    print(f"\n| speed on {name} ({family}, {px} px, {dname}) | seconds | ratio |\n|---|---|---|")
    for k, v in spd.items():
        b = base.get(k)
        print(f"| {k} | {v:.3f} | {f'{v / spd[b]:.2f}' if b in spd else ''} |")
    plain = spd.get(method_row(steps, None))
    if plain:
        print(f"\n| {steps} steps, {px} px, {dname}, on {name} | seconds | overhead | the paper's overhead |\n"
              "|---|---|---|---|")
        print(f"| plain | {plain:.3f} | - | - |")
        for m in (*METHODS, "compiled"):
            v = spd.get(method_row(steps, m))
            if m == "compiled" and not v and not any(k.startswith(method_row(steps, m)) for k in data["errors"]):
                continue   # not asked for
            label = "Attention Regulation, optimiser compiled" if m == "compiled" else METHODS[m].title
            paper = PAPER["regulate" if m == "compiled" else m][3]
            shown = f"{v:.3f} | {100 * (v / plain - 1):+.1f}%" if v else "not measured | -"
            print(f"| {label} | {shown} | {paper} |")
    for k, v in data["errors"].items():
        print(f"error in {k}: {v}")
    for k, v in data["skipped"].items():
        print(f"skipped {k}: {v}")
    print(f"\n(ratios: each row to the row it is measured against: UNet calls and plain generations to diffusers, "
          f"regulated and compiled generations to minisd plain, each method to minisd plain on the methods' "
          f"prompt; total {data['seconds']:.0f} s; JSON in {json_path})")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu")
    ap.add_argument("--json", required=True, help="where to write the results (rewritten after every row)")
    ap.add_argument("--family", default=None, help="model config (default: sd1 on CUDA, tiny on the CPU)")
    ap.add_argument("--size", type=int, default=None, help="pixels (default: 512 on CUDA, the model's own on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="generation steps (default: 50 on CUDA, 4 on CPU)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after a warm-up (median)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="speed dtype (default: float16 on CUDA)")
    ap.add_argument("--backend", default="eager", choices=["eager", "inductor", "openvino"],
                    help="also time minisd's compiled path")
    ap.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                    help="time Attention Regulation with its optimiser compiled (default: on CUDA only; on the CPU "
                         "the compile costs seconds to a minute and saves nothing measurable)")
    ap.add_argument("--only", default="all", choices=["all", "overhead"],
                    help="overhead: only the methods' generations (the paper's overhead column): no parity, no "
                         "diffusers")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} but torch {torch.__version__} sees no CUDA device "
              f"(use --device cpu for the quick check)", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    family = args.family or ("sd1" if gpu else "tiny")
    steps = args.steps or (50 if gpu else 4)
    dtype = DTYPES[args.dtype or ("float16" if gpu else "float32")]
    log = lambda *a: print(*a, flush=True)
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    start = time.perf_counter()
    pipe, theirs = build(family, with_diffusers=has_diffusers and args.only == "all")
    px = args.size or (512 if gpu else pipe.cfg.image_size)
    log(f"gpu_check on {name}: {family}, {px} px, torch {torch.__version__}; "
        f"built in {time.perf_counter() - start:.0f} s")
    dname = str(dtype).removeprefix("torch.")
    res = Results(args.json, log, device=name, family=family, px=px, steps=steps, dtype=dname,
                  torch=torch.__version__, seconds=None)
    if args.only == "all" and not has_diffusers:
        res.skip("minisd vs diffusers rows", "diffusers is not installed here (carry its wheel: docs/speed.md)")
    if args.only == "all":
        parity(pipe, theirs, device, min(px, 256), res)
    compiled = gpu if args.compiled is None else args.compiled
    speed(pipe, theirs, device, dtype, px, steps, args.runs, args.backend, res, args.only, compiled)
    res.data["seconds"] = time.perf_counter() - start
    res.save()
    report(res.data, steps, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
