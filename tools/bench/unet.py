"""How fast is minisd's UNet next to diffusers' UNet2DConditionModel, eager, compiled (minisd/fast.py) and under
OpenVINO?

One UNet call of the full SD 1.5 architecture, batch 2 (the two halves of classifier-free guidance), every path
with the same weights (random, made key by key from the official names, so every process makes the same ones
without a file) and the same thread count. Times are medians of interleaved rounds (each round calls every path
once, so a change of load on a shared machine hits all alike), after --warmup untimed calls of each path (the first
compiles; OpenVINO's requests settle over the next), given as ratios to diffusers eager measured in the same
process. One process per (size, dtype) times:
  diffusers eager, minisd eager, minisd's fast path (--backend), both minisd paths regulated (Attention Regulation
            on the 5 default cross-attention layers, conditional half, as at a step < 25), and
  openvino  diffusers' UNet converted with openvino.convert_model (hooks cannot run there): float32 with
            INFERENCE_PRECISION_HINT f32, bfloat16 with bf16. Left out if openvino is not installed or with
            --no-openvino. The last lines give minisd's fast path over it, plain and regulated, in seconds of the
            same rounds (the goal in docs/speed.md: at most 1.2).
At 512 px in float32 the process peaks near 19 GB (both OpenVINO models hold their own copies of the weights).
Outputs are compared with minisd eager float32 (same weights and inputs in every process; regulated paths with
regulated minisd eager); "bf16 drift" is a
path's bfloat16 output against its own float32 output (relative: max |diff| / max |float32 output|).
"RSS +MB" is how much the process's peak resident memory grew while that path was built and first called
(paths are built in the order of the table; weights shared between diffusers and minisd eager are counted once).

    python -m tools.bench unet --fast --sizes 256 --dtypes float32 bfloat16 --rounds 5
    python -m tools.bench unet --backend openvino --sizes 256
    python -m tools.bench unet --family tiny --sizes 128 --rounds 2 --fast     # seconds (plus compile): a check
    python -m tools.bench unet --family sdxl --sizes 512 --rounds 1 --no-openvino   # SDXL base (10 GB in float32)

SDXL's UNet also takes the pooled text and the six micro-conditioning numbers: diffusers as text_embeds and
time_ids, minisd as the vector it makes of them (model.py's `vector`, inside the timed call).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]   # the repository
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFIX = "model.diffusion_model."


def model_config(family):
    from minisd.config import FAMILIES
    return FAMILIES[family]()


def unet_config(family):
    return model_config(family).unet


def micro_cond_dim(family):
    return model_config(family).micro_cond_dim


def official_unet_state(unet_cfg, dtype, seed=0):
    """Random weights under the official names (`input_blocks.1.0.in_layers.2.weight` ...), each tensor drawn from
    a generator seeded by its name: the same in every process, in any order. Norm scales near 1, matrices and
    kernels scaled by 1/sqrt(fan-in), so activations keep a sane size through the network."""
    from minisd.unet import UNet
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(unet_cfg).state_dict().items()}
    state = {}
    for k, shape in shapes.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(k.encode()))
        r = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            r *= shape[1:].numel() ** -0.5
        elif k.endswith("weight"):  # GroupNorm / LayerNorm scale
            r = 1 + 0.1 * r
        else:
            r *= 0.02
        state[k] = r.to(dtype)
    return state


def diffusers_unet(unet_cfg, state, micro_dim=256):
    """diffusers' UNet2DConditionModel filled from official-named weights by diffusers' own converter (not minisd's
    mapping: the two sides share nothing but the tensors). Works on the meta device too."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from tools.parity import diffusers_unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_config(unet_cfg, micro_dim))
    official = {PREFIX + k: v for k, v in state.items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(official, dict(unet.config)), strict=True, assign=True)
    return unet.eval()


def minisd_unet(unet_cfg, state):
    """minisd's UNet on `state` (no copy), its attention layers named and sharing one hook list as in
    StableDiffusion."""
    from minisd.attention import Attention
    from minisd.unet import UNet
    with torch.device("meta"):
        unet = UNet(unet_cfg)
    unet.load_state_dict(state, strict=True, assign=True)
    unet.requires_grad_(False)
    unet.hooks = []
    for name, m in unet.named_modules():
        if isinstance(m, Attention):
            m.name, m.hooks = PREFIX + name, unet.hooks
    return unet.eval()


def vector(sdxl, micro_dim):
    """SDXL's (pooled text, time_ids (b, 6)) -> minisd's vector conditioning y, as StableDiffusion.vector; None
    -> None (SD 1/2)."""
    from minisd.unet import timestep_embedding
    if sdxl is None:
        return None
    pooled, ids = sdxl
    return torch.cat([pooled, timestep_embedding(ids.flatten(), micro_dim).reshape(len(ids), -1).to(pooled.dtype)], -1)


def diffusers_extra(sdxl):
    """SDXL's (pooled text, time_ids) as diffusers' UNet takes them."""
    return {} if sdxl is None else {"added_cond_kwargs": {"text_embeds": sdxl[0], "time_ids": sdxl[1]}}


def build(impl, unet_cfg, dtype, micro_dim=256):
    """One eager UNet, for the tests: -> a function (x, t, context, sdxl=None) -> prediction, and the model's weight
    bytes. For SDXL, `sdxl` is (pooled text, time_ids (b, 6))."""
    state = official_unet_state(unet_cfg, dtype)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    if impl == "minisd":
        unet = minisd_unet(unet_cfg, state)
        return (lambda x, t, ctx, sdxl=None: unet(x, t, ctx, vector(sdxl, micro_dim))), nbytes
    unet = diffusers_unet(unet_cfg, state, micro_dim)
    return (lambda x, t, ctx, sdxl=None:
            unet(x, t, encoder_hidden_states=ctx, return_dict=False, **diffusers_extra(sdxl))[0]), nbytes


def regulation_hook(model_cfg, cond_rows):
    """Attention Regulation on the default layers, two targets, as at step 0 of a 50-step run."""
    from regulation.attention_regulation import AttentionRegulation
    hook = AttentionRegulation([2, 5], 8, 50, model_config=model_cfg, generator=0)
    hook.begin_step(0, cond_rows)
    return hook


class Plain(torch.nn.Module):
    """diffusers' UNet as (x, t, context[, text_embeds, time_ids]) -> tensor, for tracing."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, text_embeds=None, time_ids=None):
        sdxl = None if text_embeds is None else (text_embeds, time_ids)
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False, **diffusers_extra(sdxl))[0]


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_paths(model_cfg, dtype, backend, inputs, log, warmup=2, openvino=True):
    """-> {path name: (function () -> output, seconds of one-time compile or conversion, RSS growth MB)}."""
    unet_cfg, micro = model_cfg.unet, model_cfg.micro_cond_dim
    x, t, ctx, sdxl = inputs
    paths = {}

    def add(name, make):
        rss, start = _rss_mb(), time.perf_counter()
        fn = make()
        with torch.inference_mode():
            fn()  # compiles where there is something to compile
            setup = time.perf_counter() - start
            for _ in range(warmup - 1):
                fn()
        paths[name] = (fn, setup, _rss_mb() - rss)
        log(f"    built {name}: {paths[name][1]:.1f} s, peak RSS +{paths[name][2]:.0f} MB")

    state = official_unet_state(unet_cfg, dtype)
    d = diffusers_unet(unet_cfg, state, micro)
    add("diffusers eager", lambda: lambda: d(x, t, encoder_hidden_states=ctx, return_dict=False,
                                             **diffusers_extra(sdxl))[0])
    from minisd.fast import compile_unet
    unet = minisd_unet(unet_cfg, state)
    eager = unet.forward

    def call(fn, regulated):
        def run():
            # a fresh editor per call: its random draws start from its seed, so calls compare
            unet.hooks[:] = [regulation_hook(model_cfg, slice(1, 2))] if regulated else []
            try:
                return fn(x, t, ctx, vector(sdxl, micro))
            finally:
                unet.hooks[:] = []
        return run
    add("minisd eager", lambda: call(eager, False))
    add("minisd eager regulated", lambda: call(eager, True))
    if backend != "eager":
        add(f"minisd {backend}", lambda: call(compile_unet(unet, backend, log=log), False))
        add(f"minisd {backend} regulated", lambda: call(unet, True))
    if openvino:
        import openvino as ov

        def convert():
            # diffusers' UNet (minisd's turns the timestep into a constant when traced), converted from float32
            # weights; the bf16 column asks OpenVINO to run in bf16
            unet = d if dtype == torch.float32 else \
                diffusers_unet(unet_cfg, official_unet_state(unet_cfg, torch.float32), micro)
            ex = (x.float(), t, ctx.float()) + (() if sdxl is None else (sdxl[0].float(), sdxl[1]))
            with torch.no_grad():
                m = ov.convert_model(Plain(unet), example_input=ex)
            hint = "f32" if dtype == torch.float32 else "bf16"
            compiled = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                           "INFERENCE_NUM_THREADS": torch.get_num_threads()})
            request = compiled.create_infer_request()
            feeds = [a.numpy() for a in ex]
            return lambda: torch.from_numpy(request.infer(feeds)[0].copy())
        add("openvino converted", convert)
    return paths


def measure(family, px, dtype_name, rounds, threads, backend, out_path, warmup=2, openvino=True):
    """Runs in a child process: build every path, then time them in interleaved rounds."""
    torch.set_num_threads(threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    model_cfg, dtype = model_config(family), DTYPES[dtype_name]
    unet_cfg = model_cfg.unet
    g = torch.Generator().manual_seed(0)
    side = px // 8
    x = torch.randn(2, unet_cfg.in_channels, side, side, generator=g).to(dtype)
    ctx = torch.randn(2, 77, unet_cfg.context_dim, generator=g).to(dtype)
    t = torch.full((2,), 500)
    sdxl = None
    if unet_cfg.adm_in_channels:  # SDXL: pooled text and time_ids (original size, crop, target size)
        pooled = torch.randn(2, unet_cfg.adm_in_channels - 6 * model_cfg.micro_cond_dim, generator=g).to(dtype)
        sdxl = (pooled, torch.tensor([[px, px, 0, 0, px, px]] * 2, dtype=torch.float32))
    paths = build_paths(model_cfg, dtype, backend, (x, t, ctx, sdxl), log, warmup, openvino)
    times = {name: [] for name in paths}
    outputs = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, (fn, _, _) in paths.items():
                start = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - start)
    torch.save({k: v.float() for k, v in outputs.items()}, out_path)
    return {name: dict(median_s=statistics.median(ts), times=ts, setup_s=paths[name][1], rss_mb=paths[name][2],
                       finite=bool(torch.isfinite(outputs[name]).all()))
            for name, ts in times.items()}


def run_child(args, px, dtype, out_path):
    cmd = [sys.executable, "-m", "tools.bench.unet", "--child", "--family", args.family, "--sizes", str(px),
           "--dtypes", dtype, "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--threads",
           str(args.threads), "--backend", args.backend, "--out", str(out_path)] + \
        (["--no-openvino"] * args.no_openvino)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        print(f"  {px}px {dtype} failed (exit {p.returncode})", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench unet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides in pixels")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds after the warm-up (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each path first (the first compiles)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--family", default="sd1", help="sd1 (SD 1.5, the default), sd2, sdxl, tiny, tiny-sdxl ...")
    ap.add_argument("--backend", default="eager", choices=["eager", "inductor", "openvino"],
                    help="minisd's fast path (minisd/fast.py); eager: no fast path")
    ap.add_argument("--fast", action="store_true", help="the same as --backend inductor")
    ap.add_argument("--no-openvino", action="store_true", help="leave out the converted OpenVINO model")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fast:
        args.backend = "inductor"
    try:
        import openvino
        ov_version = openvino.__version__
    except ImportError:
        args.no_openvino, ov_version = True, "not installed"
    if args.child:
        print(json.dumps(measure(args.family, args.sizes[0], args.dtypes[0], args.rounds, args.threads, args.backend,
                                 args.out, args.warmup, not args.no_openvino)))
        return None
    import diffusers
    print(f"UNet of {args.family}, batch 2, {args.threads} threads, median of {args.rounds} interleaved rounds after "
          f"{args.warmup} warm-up calls; torch {torch.__version__}, diffusers {diffusers.__version__}, openvino "
          f"{ov_version}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_unet_"))
    rows, outs, goal = [], {}, []
    for px in args.sizes:
        for dtype in sorted(args.dtypes, key=lambda d: d != "float32"):   # float32 first: the reference
            path = tmp / f"{px}-{dtype}.pt"
            print(f"  {px} px {dtype} ...", flush=True)
            r = run_child(args, px, dtype, path)
            if r is None:
                continue
            outs.update({(px, dtype, name): o for name, o in torch.load(path).items()})
            base = r["diffusers eager"]["median_s"]
            for name, m in r.items():
                rows.append(dict(px=px, dtype=dtype, path=name, ratio=m["median_s"] / base, **m))
            if "openvino converted" in r and args.backend != "eager":
                ov = r["openvino converted"]["times"]
                for reg in ("", " regulated"):
                    # per round, the fast path's seconds over the converted model's in the same round
                    per = [a / b for a, b in zip(r[f"minisd {args.backend}{reg}"]["times"], ov)]
                    goal.append(f"{px} px {dtype}: minisd {args.backend}{reg} / openvino converted = "
                                f"{statistics.median(per):.2f} (rounds {min(per):.2f}-{max(per):.2f}); "
                                f"diffusers eager / minisd {args.backend}{reg} = "
                                f"{base / r[f'minisd {args.backend}{reg}']['median_s']:.2f}")
    # regulated paths against regulated minisd eager, plain ones against plain minisd eager
    ref = {(px, reg): outs.get((px, "float32", "minisd eager" + reg))
           for px in args.sizes for reg in ("", " regulated")}
    print("\n| px | dtype | path | time / diffusers eager | median s | one-time s | RSS +MB | max abs diff vs "
          "minisd eager f32 | bf16 drift (rel.) |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        px, dtype, name = r["px"], r["dtype"], r["path"]
        o = outs.get((px, dtype, name))
        base = ref[px, " regulated" if name.endswith(" regulated") else ""]
        diff = "" if base is None or o is None or dtype != "float32" else f"{(o - base).abs().max().item():.1e}"
        f32 = outs.get((px, "float32", name))
        drift = f"{_rel(o, f32):.1e}" if dtype != "float32" and o is not None and f32 is not None else ""
        print(f"| {px} | {dtype} | {name} | {r['ratio']:.2f} | {r['median_s']:.3f} | {r['setup_s']:.1f} | "
              f"{r['rss_mb']:.0f} | {diff} | {drift} |" + ("" if r["finite"] else " non-finite!"))
    if goal:
        print("\nThe goal (fast path <= 1.2x the converted model's time, >= 2x faster than diffusers eager):")
        print("\n".join(goal))
    return rows


if __name__ == "__main__":
    main()
