"""How fast is minisd's UNet next to diffusers' UNet2DConditionModel?

One UNet call of the full SD 1.5 architecture, batch 2 (the two halves of classifier-free guidance), both
implementations with the same weights (random, made key by key from the official names, so every process makes
the same ones without a file) and the same thread count. Each (implementation, size, dtype) runs in its own
process so that its peak resident memory (ru_maxrss) is its own; the time is the median of --runs calls after a
warm-up call.

    python -m tools.bench_unet                                # 512 and 256 px, float32 and bfloat16, 5 runs
    python -m tools.bench_unet --sizes 64 --runs 2            # a quick check that it works
    python -m tools.bench_unet --family tiny --sizes 64       # seconds: the tiny test model
    python -m tools.bench_unet --family sdxl --sizes 512 --runs 1   # SDXL base (10 GB of float32 weights)

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
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unet_config(family):
    from minisd.config import FAMILIES
    return FAMILIES[family]().unet


def official_unet_state(cfg, dtype, seed=0):
    """Random weights under the official names (`input_blocks.1.0.in_layers.2.weight` ...), each tensor drawn from
    a generator seeded by its name: the same in every process, in any order. Norm scales near 1, matrices and
    kernels scaled by 1/sqrt(fan-in), so activations keep a sane size through the network."""
    from minisd.unet import UNet
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(cfg).state_dict().items()}
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


def micro_cond_dim(family):
    from minisd.config import FAMILIES
    return FAMILIES[family]().micro_cond_dim


def diffusers_unet(cfg, state, micro_dim=256):
    """diffusers' UNet2DConditionModel filled from official-named weights by diffusers' own converter (not minisd's
    mapping: the two sides share nothing but the tensors). Works on the meta device too."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from tools.parity import diffusers_unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_config(cfg, micro_dim))
    official = {"model.diffusion_model." + k: v for k, v in state.items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(official, dict(unet.config)), strict=True, assign=True)
    return unet.eval()


def build(impl, cfg, dtype, micro_dim=256):
    """-> a function (x, t, context, sdxl=None) -> prediction, and the model's weight bytes. For SDXL, `sdxl` is
    (pooled text, time_ids (b, 6))."""
    state = official_unet_state(cfg, dtype)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    if impl == "minisd":
        from minisd.unet import UNet, timestep_embedding
        with torch.device("meta"):
            unet = UNet(cfg)
        unet.load_state_dict(state, strict=True, assign=True)
        unet.eval()

        def run(x, t, ctx, sdxl=None):
            y = None
            if sdxl is not None:  # as StableDiffusion.vector
                pooled, ids = sdxl
                y = torch.cat([pooled, timestep_embedding(ids.flatten(), micro_dim).reshape(len(ids), -1).to(pooled.dtype)], -1)
            return unet(x, t, ctx, y)
        return run, nbytes
    unet = diffusers_unet(cfg, state, micro_dim)

    def run(x, t, ctx, sdxl=None):
        extra = {} if sdxl is None else {"added_cond_kwargs": {"text_embeds": sdxl[0], "time_ids": sdxl[1]}}
        return unet(x, t, encoder_hidden_states=ctx, return_dict=False, **extra)[0]
    return run, nbytes


def measure(impl, family, px, dtype_name, runs, threads):
    """Runs in the child process: build, warm up, time. -> a dict of results."""
    torch.set_num_threads(threads)
    cfg, dtype = unet_config(family), DTYPES[dtype_name]
    start = time.perf_counter()
    micro = micro_cond_dim(family)
    fn, nbytes = build(impl, cfg, dtype, micro)
    built = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    side = px // 8
    x = torch.randn(2, cfg.in_channels, side, side, generator=g).to(dtype)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g).to(dtype)
    t = torch.full((2,), 500)
    sdxl = None
    if cfg.adm_in_channels:
        pooled = torch.randn(2, cfg.adm_in_channels - 6 * micro, generator=g).to(dtype)
        sdxl = (pooled, torch.tensor([[px, px, 0, 0, px, px]] * 2, dtype=torch.float32))
    times = []
    with torch.inference_mode():
        out = fn(x, t, ctx, sdxl)  # warm-up: one-time allocations and kernel choices
        for _ in range(runs):
            start = time.perf_counter()
            out = fn(x, t, ctx, sdxl)
            times.append(time.perf_counter() - start)
    return dict(impl=impl, family=family, px=px, dtype=dtype_name, threads=threads, median_s=statistics.median(times),
                times=times, build_s=built, weights_mb=nbytes / 2 ** 20, finite=bool(torch.isfinite(out).all()),
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_child(impl, family, px, dtype, runs, threads):
    cmd = [sys.executable, "-m", "tools.bench_unet", "--child", impl, "--family", family, "--sizes", str(px),
           "--dtypes", dtype, "--runs", str(runs), "--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"  {impl} {px}px {dtype} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 256], help="image sides in pixels")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--runs", type=int, default=5, help="timed calls after the warm-up (median reported)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--family", default="sd1", help="sd1 (SD 1.5, the default), sd2, sdxl, tiny, tiny-sdxl ...")
    ap.add_argument("--child", choices=["minisd", "diffusers"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.family, args.sizes[0], args.dtypes[0], args.runs, args.threads)))
        return None

    import diffusers
    print(f"UNet of {args.family}, batch 2, {args.threads} threads, median of {args.runs} runs; "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}", flush=True)
    rows = []
    for px in args.sizes:
        for dtype in args.dtypes:
            r = {impl: run_child(impl, args.family, px, dtype, args.runs, args.threads)
                 for impl in ("minisd", "diffusers")}
            if None in r.values():
                continue
            rows.append((px, dtype, r["minisd"], r["diffusers"]))
            print(f"  {px} px {dtype}: minisd {r['minisd']['median_s']:.3f} s, "
                  f"diffusers {r['diffusers']['median_s']:.3f} s", flush=True)
    print("\n| px | dtype | minisd s | diffusers s | minisd/diffusers | weights MB | peak RSS MB minisd | "
          "peak RSS MB diffusers |\n|---|---|---|---|---|---|---|---|")
    for px, dtype, m, d in rows:
        print(f"| {px} | {dtype} | {m['median_s']:.3f} | {d['median_s']:.3f} | {m['median_s'] / d['median_s']:.2f} | "
              f"{m['weights_mb']:.0f} | {m['peak_rss_mb']:.0f} | {d['peak_rss_mb']:.0f} |")
        if not (m["finite"] and d["finite"]):
            print(f"  warning: non-finite output at {px} px {dtype} (minisd {m['finite']}, diffusers {d['finite']})")
    return rows


if __name__ == "__main__":
    main()
