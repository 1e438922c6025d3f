"""Does minisd run right, and fast, on a GPU? One short command that prints a markdown table and writes a JSON.

    python -m tools.gpu_check --json gpu_check.json                     # CUDA: SD 1.5 architecture, random weights
    python -m tools.gpu_check --json gpu_check.json --backend inductor  # also the compiled path (minisd/fast.py)
    python -m tools.gpu_check --device cpu --json /tmp/check.json       # the tiny model, seconds (the suite runs it)

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
random weights on the CPU); on --device cpu the tiny config at 32 px and 4 steps.
"""
import argparse
import contextlib
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


def _median_time(fn, device, runs):
    fn()   # warm-up
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


def build(family, seed=0):
    """minisd's model (random weights) and diffusers' pipeline with the same tensors, both float32 on the CPU."""
    from minisd.checkpoint import build_model
    from minisd.config import FAMILIES
    from minisd.pipeline import Pipeline
    from tools.bench.generate import diffusers_from_minisd
    model = build_model(FAMILIES[family](), seed=seed).eval().requires_grad_(False)
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    theirs = diffusers_from_minisd(model, Path(tmp) / "vocab")
    return Pipeline(model), theirs


def regulation_editor(pipe, steps):
    from regulation.editors import choose_targets, make_editor
    targets = choose_targets(pipe.tokenizer, PROMPT, ["cat", "dog"], log=_quiet)
    return make_editor("regulate", pipe, PROMPT, targets, steps, seed=0)


def parity(pipe, theirs, device, px, log):
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
    rows = {}
    model.to(device)
    theirs.to(device)
    dev_x, dev_t, dev_ctx = x.to(device), t.to(device), context.to(device)
    with torch.no_grad():
        out = unet_call()
        rows["unet f32 (device vs CPU)"] = _diff(out, ref["unet"])
        d = theirs.unet(dev_x, dev_t, encoder_hidden_states=dev_ctx, return_dict=False)[0]
        rows["unet f32 (minisd vs diffusers, device)"] = _diff(out, d)
        rows["regulated f32 (device vs CPU)"] = _diff(unet_call([editor()]), ref["regulated"])
        rows["maps f32 (device vs CPU)"] = _diff(observed(), ref["maps"])
        mine_img = model.decode_latents(z.to(device))
        their_img = ((theirs.vae.decode(z.to(device) / cfg.vae.scale_factor).sample + 1) / 2).clamp(0, 1)
        rows["vae f32 (minisd vs diffusers, device)"] = _diff(mine_img, their_img)
        for name in ("float16", "bfloat16"):
            if device.type == "cpu" and name == "float16":
                continue   # float16 convolutions are a GPU matter
            model.to(dtype=DTYPES[name])
            rows[f"unet {name} drift (device vs CPU f32)"] = _diff(unet_call(), ref["unet"])
            rows[f"regulated {name} drift (device vs CPU f32)"] = _diff(unet_call([editor()]), ref["regulated"])
            model.to(dtype=torch.float32)
    for k, v in rows.items():
        log(f"  {k}: max |diff| {v['max_abs']:.2e} (rel {v['rel']:.2e})")
    return rows


def speed(pipe, theirs, device, dtype, px, steps, runs, backend, log):
    cfg, model = pipe.cfg, pipe.model
    model.to(device=device, dtype=dtype)
    theirs.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    side = px // cfg.vae.downsample
    x = torch.randn(2, cfg.unet.in_channels, side, side, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    with torch.no_grad():
        ctx = pipe.encode_prompts(["", PROMPT]).to(device, dtype)
    latents = torch.randn(1, cfg.unet.in_channels, side, side, generator=g)
    res = {}
    with torch.inference_mode():
        res["unet call, minisd"] = _median_time(lambda: model.unet(x, t, ctx), device, runs)
        res["unet call, diffusers"] = _median_time(
            lambda: theirs.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0], device, runs)
    run = dict(steps=steps, guidance=7.5, height=px, width=px, sampler="dpmpp_2m")

    def mine(regulated=False):
        hooks = [regulation_editor(pipe, steps)] if regulated else []
        with torch.inference_mode():
            pipe(PROMPT, latents=latents.clone(), hooks=hooks, decode=True, **run)

    def diffusers_run():
        with torch.inference_mode():
            theirs(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=px, width=px,
                   latents=latents.clone().to(device, dtype))

    res[f"{steps}-step generation, minisd"] = _median_time(mine, device, runs)
    res[f"{steps}-step generation, diffusers"] = _median_time(diffusers_run, device, runs)
    res[f"{steps}-step generation, minisd regulated"] = _median_time(lambda: mine(True), device, runs)
    if backend != "eager":
        start = time.perf_counter()
        pipe.compile(backend)
        with torch.inference_mode():
            model.unet(x, t, ctx)
        res[f"compile ({backend}), one-time"] = time.perf_counter() - start
        res[f"unet call, minisd {backend}"] = _median_time(lambda: model.unet(x, t, ctx), device, runs)
        res[f"{steps}-step generation, minisd {backend}"] = _median_time(mine, device, runs)
        res[f"{steps}-step generation, minisd {backend} regulated"] = _median_time(lambda: mine(True), device,
                                                                                   runs)
    res.update(methods(pipe, device, latents, run, runs))
    for k, v in res.items():
        log(f"  {k}: {v:.3f} s")
    return res


METHOD_PROMPT = "a black cat and a white dog"   # modifiers for SynGen, two phrases for the layout and the concepts
LAYOUT = "black cat:0.05,0.1,0.5,0.9;white dog:0.5,0.1,0.95,0.9"


def methods(pipe, device, latents, run, runs):
    """Every method of the paper's table at its defaults, and Attention Regulation's optimiser compiled into one
    graph (RegulationConfig(compile=True): on CUDA one CUDA graph per layer and step), each a whole generation
    of METHOD_PROMPT from the same latents: {row: seconds}, plain first, so that each overhead is measured against
    a plain run of the same prompt in the same process."""
    from regulation.attention_regulation import RegulationConfig
    from regulation.editors import METHODS, choose_targets, make_editor, set_up
    steps = run["steps"]
    targets = choose_targets(pipe.tokenizer, METHOD_PROMPT, ["cat", "dog"], log=_quiet)

    def generate(method=None, compiled=False):
        hooks, options, context = [], {}, None
        if compiled:
            hooks = [make_editor("regulate", pipe, METHOD_PROMPT, targets, steps, seed=0,
                                 config=RegulationConfig(compile=True))]
        elif method:
            r = set_up(method, pipe, METHOD_PROMPT, steps, seed=0, log=_quiet, guidance=run["guidance"],
                       height=run["height"], width=run["width"],
                       targets=targets if method in ("regulate", "attend-excite") else None,
                       layout=LAYOUT if method == "dense" else None)
            hooks, options, context = r.hooks, r.options, r.context
        with context or contextlib.nullcontext():   # no inference_mode: A&E and SynGen take gradients
            pipe(METHOD_PROMPT, latents=latents.clone(), hooks=hooks, decode=True, **run, **options)

    out = {f"{steps}-step generation, minisd plain (methods' prompt)": _median_time(generate, device, runs)}
    for m in METHODS:
        out[f"{steps}-step generation, minisd {m}"] = _median_time(lambda: generate(m), device, runs)
    if device.type == "cuda":   # on the CPU the compile costs a minute and saves nothing: the suite skips it
        out[f"{steps}-step generation, minisd regulate compiled"] = _median_time(lambda: generate(compiled=True),
                                                                                 device, runs)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu")
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--family", default=None, help="model config (default: sd1 on CUDA, tiny on the CPU)")
    ap.add_argument("--size", type=int, default=None, help="pixels (default: 512 on CUDA, the model's own on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="generation steps (default: 50 on CUDA, 4 on CPU)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after a warm-up (median)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="speed dtype (default: float16 on CUDA)")
    ap.add_argument("--backend", default="eager", choices=["eager", "inductor", "openvino"],
                    help="also time minisd's compiled path")
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
    start = time.perf_counter()
    pipe, theirs = build(family)
    px = args.size or (512 if gpu else pipe.cfg.image_size)
    log(f"gpu_check on {name}: {family}, {px} px, torch {torch.__version__}; "
        f"built in {time.perf_counter() - start:.0f} s")
    par = parity(pipe, theirs, device, min(px, 256), log)
    spd = speed(pipe, theirs, device, dtype, px, steps, args.runs, args.backend, log)
    dname = str(dtype).removeprefix("torch.")
    out = dict(device=name, family=family, px=px, steps=steps, dtype=dname, torch=torch.__version__,
               parity=par, speed=spd, seconds=time.perf_counter() - start)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))

    print(f"\n| parity on {name} ({family}, {min(px, 256)} px) | max abs diff | relative | finite |\n|---|---|---|---|")
    for k, v in par.items():
        print(f"| {k} | {v['max_abs']:.2e} | {v['rel']:.2e} | {v['finite']} |")
    print(f"\n| speed on {name} ({family}, {px} px, {dname}) | seconds | ratio |\n|---|---|---|")
    gen = f"{steps}-step generation, minisd"
    for k, v in spd.items():
        plain_m = f"{steps}-step generation, minisd plain (methods' prompt)"
        base = spd["unet call, diffusers"] if k.startswith("unet call") else (
            spd[f"{steps}-step generation, diffusers"] if "diffusers" in k or k == gen else
            spd[plain_m] if k in spd and list(spd).index(k) > list(spd).index(plain_m) else spd.get(gen))
        ratio = "" if k.startswith("compile") else f"{v / base:.2f}"
        print(f"| {k} | {v:.3f} | {ratio} |")
    print(f"\n(ratios: UNet calls and plain generations to diffusers; regulated and compiled generations to minisd "
          f"plain; each method to minisd plain on the methods' prompt; total {out['seconds']:.0f} s; JSON in "
          f"{args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
