"""python -m tools.bench optimizer [--runs 50] [--threads 1]

The fast Attention Regulation step (regulation/attention_regulation.py) against the straightforward reference
(tools/bench/reference_regulation.py) on the tensors of one SD 1.5 layer at 512 px: 8 heads of one image, 16x16
maps, 77 tokens, 2 targets. Prints the median time of each (wall clock and CPU time: the CPU time is the steadier one
on a shared machine), their ratio, and how far apart their outputs are in float32 and float64.
"""
import argparse
import os
import statistics

import torch

from tools.bench.timing import timed


def add_arguments(p):
    p.add_argument("--runs", type=int, default=50, help="timed runs of each (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--heads", type=int, default=8, help="N = images x heads")
    p.add_argument("--size", type=int, default=16, help="map side w (w x w queries)")
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--targets", type=int, default=2, help="number of target tokens k")
    p.add_argument("--seed", type=int, default=0)


def run(args):
    from regulation.attention_regulation import regulate_logits
    from tools.bench.reference_regulation import reference_regulate

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
        times["fast"].append(timed(fast)[1:])
        times["reference"].append(timed(ref)[1:])
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench optimizer", description=__doc__.split("\n\n")[1])
    add_arguments(ap)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
