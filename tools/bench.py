"""Benchmarks, one sub-command each.

    python -m tools.bench optimizer [--runs 50] [--threads 1]
    python -m tools.bench load /tmp/sd15-random.safetensors --dtype bfloat16

`optimizer`: the fast Attention Regulation step (regulation/attention_regulation.py) against the straightforward
reference (tests/reference_regulation.py) on the tensors of one SD 1.5 layer at 512 px: 8 heads of one image,
16x16 maps, 77 tokens, 2 targets. Prints the median time of each (wall clock and CPU time: the CPU time is the
steadier one on a shared machine), their ratio, and how far apart their outputs are in float32 and float64.
"""
import argparse
import importlib
import sys
import os
import statistics
import time

import torch


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def optimizer_args(p):
    p.add_argument("--runs", type=int, default=50, help="timed runs of each (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--heads", type=int, default=8, help="N = images x heads")
    p.add_argument("--size", type=int, default=16, help="map side w (w x w queries)")
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--targets", type=int, default=2, help="number of target tokens k")
    p.add_argument("--seed", type=int, default=0)


def optimizer(args):
    from regulation.attention_regulation import regulate_logits
    from tests.reference_regulation import reference_regulate

    torch.set_num_threads(args.threads)
    shape, hw = (args.heads, args.size * args.size, args.tokens), (args.size, args.size)
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(args.seed))
    targets = list(range(2, 2 + 3 * args.targets, 3))
    gen = lambda: torch.Generator().manual_seed(args.seed + 1)
    fast = lambda x=logits: regulate_logits(x, hw, targets, 1, None, gen())[0]
    ref = lambda dtype=torch.float32: reference_regulate(logits, hw, targets, 1, None, gen(), dtype=dtype)[0]

    for _ in range(args.warmup):
        fast(), ref()
    times = {"fast": [], "reference": []}
    for _ in range(args.runs):   # interleaved, so that a change of load on the machine hits both alike
        times["fast"].append(_timed(fast))
        times["reference"].append(_timed(ref))
    med = {k: [statistics.median(t[i] for t in v) * 1e3 for i in (0, 1)] for k, v in times.items()}

    print(f"optimizer: N={args.heads}, {args.size}x{args.size} maps, L={args.tokens}, k={args.targets} "
          f"(targets {targets}), {args.runs} runs, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, (wall, cpu) in med.items():
        print(f"  {name:10s} median {wall:8.2f} ms wall  {cpu:8.2f} ms CPU")
    print(f"  speed-up   {med['reference'][0] / med['fast'][0]:.1f}x wall  "
          f"{med['reference'][1] / med['fast'][1]:.1f}x CPU")
    f32, r32, f64, r64 = fast().double(), ref().double(), fast(logits.double()), ref(torch.float64)
    diff = lambda a, b: (a - b).abs().max().item()
    print(f"  max |fast - reference|: {diff(f32, r32):.2e} in float32, {diff(f64, r64):.2e} in float64")
    # The spec's gradient descent amplifies rounding, so float32 runs stray from float64 ones by themselves:
    print(f"  float32 vs float64 of the same code: fast {diff(f32, f64):.2e}, reference {diff(r32, r64):.2e}")


def load_args(p):
    p.add_argument("checkpoint", help="a single-file checkpoint; written first (random SD 1.5 weights) if absent")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--family", default="sd1", help="for the random checkpoint: sd1, sd2, tiny ...")


def load(args):
    """Peak resident memory (ru_maxrss) of a fresh process that only loads the checkpoint with load_model: what a
    generation pays before its first step. The process imports the minisd on PYTHONPATH (or this one)."""
    import subprocess
    from pathlib import Path
    path = Path(args.checkpoint)
    if not path.exists():
        from minisd.checkpoint import build_model, save_checkpoint
        from minisd.config import FAMILIES
        with torch.no_grad():
            save_checkpoint(build_model(FAMILIES[args.family]()), path)
        print(f"wrote random {args.family} weights to {path} ({path.stat().st_size / 2 ** 30:.2f} GiB)")
    code = ("import resource, sys, torch, minisd; from minisd.checkpoint import load_model; "
            f"m = load_model(sys.argv[1], dtype=torch.{args.dtype}); "
            "n = sum(p.numel() * p.element_size() for p in m.parameters()); "
            "print(minisd.__file__, n / 2 ** 20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    here = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH") or here)
    # cwd "/": python -c puts the working directory first on sys.path, before PYTHONPATH
    out = subprocess.run([sys.executable, "-c", code, str(path.resolve())], env=env, cwd="/", capture_output=True,
                         text=True, check=True)
    where, weights, peak = out.stdout.split()
    print(f"load_model({path.name}, dtype={args.dtype}) with {where}: weights {float(weights):.0f} MB, "
          f"peak RSS {float(peak):.0f} MB")


COMMANDS = {
    "optimizer": (optimizer_args, optimizer, "the Attention Regulation optimiser against its reference"),
    "load": (load_args, load, "peak memory of loading a checkpoint in a dtype"),
}


# Benchmarks with their own options live in their own modules: `python -m tools.bench unet --help`.
MODULES = {
    "unet": ("tools.bench_unet", "one UNet call of the full SD 1.5 architecture, minisd against diffusers"),
    "generate": ("tools.bench_generate", "a whole generation, minisd against diffusers"),
    "methods": ("tools.bench_methods", "the overhead of Attention Regulation and Attend-and-Excite over plain"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in MODULES:
        return importlib.import_module(MODULES[argv[0]][0]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
                                     epilog="also: " + "; ".join(f"{k}: {v[1]}" for k, v in MODULES.items()))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    COMMANDS[args.command][1](args)


if __name__ == "__main__":
    main()
