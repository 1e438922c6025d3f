"""python -m tools.bench load CHECKPOINT --dtype bfloat16

Peak memory of loading a checkpoint in a dtype, in a fresh process.
"""
import argparse
import os
import sys

import torch


def add_arguments(p):
    p.add_argument("checkpoint", help="a single-file checkpoint; written first (random SD 1.5 weights) if absent")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--family", default="sd1", help="for the random checkpoint: sd1, sd2, tiny ...")


def run(args):
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
    code = ("import resource, sys, torch, minisd; from minisd.loading import load_model; "
            f"m = load_model(sys.argv[1], dtype=torch.{args.dtype}); "
            "n = sum(p.numel() * p.element_size() for p in m.parameters()); "
            "print(minisd.__file__, n / 2 ** 20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    here = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH") or here)
    # cwd "/": python -c puts the working directory first on sys.path, before PYTHONPATH
    out = subprocess.run([sys.executable, "-c", code, str(path.resolve())], env=env, cwd="/", capture_output=True,
                         text=True, check=True)
    where, weights, peak = out.stdout.split()
    print(f"load_model({path.name}, dtype={args.dtype}) with {where}: weights {float(weights):.0f} MB, "
          f"peak RSS {float(peak):.0f} MB")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench load", description=__doc__.split("\n\n")[1])
    add_arguments(ap)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
