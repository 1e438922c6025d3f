"""What the methods cost: the whole-generation overhead of Attention Regulation and of Attend-and-Excite over plain
sampling, as the ratio method / plain (DPM-Solver++(2M), 50 steps, the same seed; Attention Regulation on the
first 25 steps as in its paper, Attend-and-Excite with its defaults).

    python -m tools.bench_methods [--only tiny|sd15] [--runs 3] [--threads N] [--size 512]

tiny: whole generations on the tiny shipped model (weights/minisd-shapes.safetensors; a random tiny model if it is
    absent), interleaved runs, median of --runs.
sd15: the SD 1.5 architecture (random weights, bfloat16, CPU) at --size px: a whole 50-step run is too slow on a
    CPU, so it times one step of each kind (median of --runs after a warm-up) and projects the 50-step overhead:
      plain step      UNet on batch 2 (classifier-free guidance)
      regulated step  the same with the 5 regulated layers edited
      A&E step        its conditional pass with gradient (batch 1, forward + backward) and the update, then the
                      plain step; no refinement
    regulate / plain = (25 regulated + 25 plain) / 50 plain
    A&E / plain      = (25 A&E + 25 plain) / 50 plain, with no refinement (its least), and with every refinement
                       of steps 0, 10, 20 running to its cap of 20 tries (its most: 60 more conditional passes
                       with gradient, each costing about A&E step - plain step)
    It also reports the peak resident memory (VmHWM, reset before the step) of an A&E step.
"""
import argparse
import os
from pathlib import Path
import resource
import statistics
import time

import torch

ROOT = Path(__file__).resolve().parents[1]
METHOD_NAMES = ("plain", "regulate", "attend-excite")


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def _median(times):
    return [statistics.median(t[i] for t in times) for i in (0, 1)]


def _quiet(*args, **kwargs):
    pass


def make_hook(method, pipe, prompt, targets, steps, seed):
    from regulation.editors import make_editor
    return None if method == "plain" else make_editor(method, pipe, prompt, targets, steps, seed=seed)


# ---------------------------------------------------------------------------------------------- tiny model

def tiny(args):
    from minisd.checkpoint import build_model
    from minisd.config import tiny as tiny_config
    from minisd.pipeline import Pipeline
    from regulation.editors import choose_targets
    from tools.shapes import benchmark_prompts

    weights = Path(args.weights)
    if weights.is_file():
        pipe, source = Pipeline.from_checkpoint(str(weights)), str(weights)
    else:
        pipe, source = Pipeline(build_model(tiny_config()).eval()), f"a random tiny model ({weights} is absent)"
    bench = benchmark_prompts(1)[0]
    prompt = args.prompt or bench["prompt"]
    words = args.targets.split() if args.targets else [shape for _, shape in bench["objects"]]
    targets = choose_targets(pipe.tokenizer, prompt, words, log=_quiet)
    run = dict(steps=args.steps, sampler="dpmpp_2m", seed=args.seed)

    def generate(method):
        hook = make_hook(method, pipe, prompt, targets, args.steps, args.seed)
        pipe(prompt, hooks=[hook] if hook else [], **run)
        return hook

    for method in METHOD_NAMES:   # warm-up
        generate(method)
    times, hooks = {m: [] for m in METHOD_NAMES}, {}
    for _ in range(args.runs):    # interleaved, so that a change of load on the machine hits every method alike
        for method in METHOD_NAMES:
            t, hooks[method] = _timed(lambda: generate(method))
            times[method].append(t)
    med = {m: _median(t) for m, t in times.items()}
    print(f"tiny: {source}, {pipe.cfg.image_size} px, {args.steps} steps dpmpp_2m, seed {args.seed}, "
          f"{args.runs} runs, {torch.get_num_threads()} threads")
    print(f"  prompt {prompt!r}, targets {[t.word for t in targets]}")
    for m, (wall, cpu) in med.items():
        ratio = (wall / med["plain"][0], cpu / med["plain"][1])
        print(f"  {m:14s} median {wall:7.2f} s wall {cpu:7.2f} s CPU   / plain: {ratio[0]:.2f}x wall {ratio[1]:.2f}x CPU")
    history = hooks["attend-excite"].history
    tries = {i: (h["tries"], h["gave_up"]) for i, h in history.items() if h["loss_refined"] is not None}
    print(f"  attend-excite: {len(history)} steps altered; refinement (step: tries, gave up): {tries or 'none'}")


# ---------------------------------------------------------------------------------------------- SD 1.5 steps

def peak_rss_reset():
    """Reset the process's peak resident memory (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_gib(field):
    """VmRSS or VmHWM from /proc/self/status (Linux), else the lifetime peak from getrusage; in GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def sd15(args):
    from minisd.checkpoint import build_model
    from minisd.config import sd1
    from minisd.pipeline import Pipeline
    from regulation.editors import choose_targets

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = build_model(sd1()).to(dtype).eval()
    model.requires_grad_(False)   # inference: A&E differentiates with respect to the latents only
    pipe = Pipeline(model)
    print(f"sd15: SD 1.5 architecture, random weights, {args.dtype}, CPU, {args.size} px, {args.runs} runs, "
          f"{torch.get_num_threads()} threads (built in {time.perf_counter() - t0:.0f} s)")
    prompt = args.prompt or "a cat and a dog"
    targets = choose_targets(pipe.tokenizer, prompt, args.targets.split() if args.targets else None, log=_quiet)
    context = pipe.encode_prompts(["", prompt])
    f = pipe.cfg.vae.downsample
    x = torch.randn(1, pipe.cfg.unet.in_channels, args.size // f, args.size // f,
                    generator=torch.Generator().manual_seed(args.seed))
    t, guidance = 921.0, 7.5

    def plain_step():
        with torch.no_grad():
            out = model.unet(torch.cat([x, x]).to(dtype), torch.tensor([t, t]), context).float()
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    def cond_unet(latents, t):
        return model.unet(latents.to(dtype), torch.tensor([t] * latents.shape[0]), context[1:]).float()

    def regulated_step(hook):
        hook.begin_step(0, slice(1, 2))   # step 0: regulated; the conditional row is the second
        return plain_step()

    def excite_step(hook):
        hook.begin_step(1, slice(None))   # step 1: altered, not a threshold step, so no refinement
        x_new = hook.edit_latents(x, t, 1, cond_unet)
        hook.begin_step(1, slice(1, 2))
        return x_new, plain_step()

    results, peaks = {}, {}
    for method in METHOD_NAMES:
        try:
            hook = make_hook(method, pipe, prompt, targets, 50, args.seed)
            step = {"plain": plain_step, "regulate": lambda: regulated_step(hook),
                    "attend-excite": lambda: excite_step(hook)}[method]
            model.set_hooks([hook] if hook else [])
            step()                                          # warm-up
            rss_before, reset = rss_gib("VmRSS"), peak_rss_reset()
            times = [_timed(step)[0] for _ in range(args.runs)]
            peaks[method] = (rss_before, rss_gib("VmHWM") if reset else None)
            results[method] = _median(times)
        except ValueError as e:   # e.g. Attention Regulation's Gaussians do not fit the 2x2 maps of 64 px
            print(f"  {method}: not measured: {e}")
        finally:
            model.set_hooks([])
    for m, (wall, cpu) in results.items():
        before, peak = peaks[m]
        mem = f"peak RSS {peak:.2f} GiB (RSS before {before:.2f} GiB)" if peak else "peak RSS: not available"
        print(f"  {m:14s} step median {wall:8.2f} s wall {cpu:8.2f} s CPU   {mem}")
    if "plain" not in results:
        return
    print("  projected 50-step overhead (ratio to 50 plain steps; wall / CPU):")
    p = results["plain"]
    if "regulate" in results:
        r = results["regulate"]
        print("    regulate       (25 regulated + 25 plain) / 50 plain = "
              + " / ".join(f"{(25 * r[k] + 25 * p[k]) / (50 * p[k]):.2f}x" for k in (0, 1)))
    if "attend-excite" in results:
        a = results["attend-excite"]
        least = [(25 * a[k] + 25 * p[k]) / (50 * p[k]) for k in (0, 1)]
        most = [(25 * a[k] + 25 * p[k] + 60 * (a[k] - p[k])) / (50 * p[k]) for k in (0, 1)]
        print("    attend-excite  (25 A&E + 25 plain) / 50 plain = "
              + " / ".join(f"{v:.2f}x" for v in least) + " with no refinement; "
              + " / ".join(f"{v:.2f}x" for v in most) + " if all 3 refinements hit their cap of 20 tries")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.bench_methods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("tiny", "sd15"), help="run one part (default: both)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each method (after a warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=50, help="tiny: sampling steps")
    parser.add_argument("--weights", default=str(ROOT / "weights" / "minisd-shapes.safetensors"),
                        help="tiny: the checkpoint (a random tiny model when absent)")
    parser.add_argument("--size", type=int, default=512, help="sd15: image side in px (a multiple of 64)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="sd15: model dtype")
    parser.add_argument("--prompt", help="default: a shapes benchmark prompt (tiny), 'a cat and a dog' (sd15)")
    parser.add_argument("--targets", help="target words, space separated (default: the prompt's objects)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.size <= 0 or args.size % 64:
        parser.error(f"--size must be a positive multiple of 64, got {args.size}")
    torch.set_num_threads(args.threads)
    if args.only in (None, "tiny"):
        tiny(args)
    if args.only in (None, "sd15"):
        sd15(args)


if __name__ == "__main__":
    main()
