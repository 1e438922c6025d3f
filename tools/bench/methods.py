"""What the methods cost: the whole-generation overhead of Attention Regulation and of Attend-and-Excite over plain
sampling, as the ratio method / plain (DPM-Solver++(2M), 50 steps, the same seed; Attention Regulation on the
first 25 steps as in its paper, Attend-and-Excite with its defaults).

    python -m tools.bench methods [--only tiny|sd15|sdxl] [--runs 3] [--threads N] [--size 512]

tiny: whole generations on the tiny shipped model (weights/minisd-shapes.safetensors; a random tiny model if it is
    absent), interleaved runs, median of --runs.
sd15: the SD 1.5 architecture (random weights, bfloat16, CPU) at --size px: a whole 50-step run is too slow on a
    CPU, so it times one step of each kind (median of --runs after a warm-up) and projects the 50-step overhead:
      plain step      UNet on batch 2 (classifier-free guidance)
      regulated step  the same with the default regulated layers edited (SD 1.5: 5)
      regulate-layers the same with the --regulate-layers choice edited (sd15: only when given)
      A&E step        its conditional pass with gradient (batch 1, forward + backward) and the update, then the
                      plain step; no refinement
    regulate / plain = (25 regulated + 25 plain) / 50 plain
    A&E / plain      = (25 A&E + 25 plain) / 50 plain, with no refinement (its least), and with every refinement
                       of steps 0, 10, 20 running to its cap of 20 tries (its most: 60 more conditional passes
                       with gradient, each costing about A&E step - plain step)
    It also reports the peak resident memory (VmHWM, reset before the step) of each kind of step.
sdxl: the same steps on the SDXL base architecture (float32 by default: bfloat16 is slow on CPUs without bf16
    units; 512 px by default: 1024 px is 4x the work). Only its UNet is built (random weights, 9.6 GiB in
    float32), with random text embeddings and pooled text (zeros for the empty negative prompt) and the
    micro-conditioning vector; the default regulated blocks are input_blocks.7/8 and output_blocks.0/1/2 (10
    transformer blocks each: 50 layers, 16x16 maps at 512 px) and regulate-layers is one transformer block,
    input_blocks.7.1.transformer_blocks.0, unless --regulate-layers says otherwise. `--methods` leaves steps
    out (attend-excite: a backward pass through SDXL). Not run unless asked:
        python -m tools.bench methods --only sdxl --runs 3 --threads 2
    needs about 11 GiB of memory, 13.5 GiB with the A&E step, and the time of about 20 plain steps (each step
    timed 4 times, an A&E step costing about 2 plain ones), a plain step roughly 0.5 to 1.5 min on 2 cores
    (estimated from half-, quarter- and eighth-width models and tools/bench/unet.py's SDXL figure).
    `--tiny` runs sd15 or sdxl on its tiny config (tiny, tiny-sdxl) in seconds, as the tests do.
    `--backend inductor|openvino` times the steps on minisd's fast path (A&E's pass with gradient stays eager).
sd15 --generations: whole generations instead of steps, plain and regulated, interleaved: the measured ratio, e.g.
    on the fast path (is a regulated 50-step run within a few percent of a plain one?):
        python -m tools.bench methods --only sd15 --generations --backend openvino --size 256 --dtype float32
"""
import argparse
from collections import namedtuple
import os
from pathlib import Path
import resource
import statistics
import time

import torch

from regulation.editors import METHODS
from tools.bench.timing import timed

ROOT = Path(__file__).resolve().parents[2]   # the repository
METHOD_NAMES = ("plain", "regulate", "attend-excite")


def _timed(fn):
    """((wall, CPU) seconds, fn's result)."""
    out, wall, cpu = timed(fn)
    return (wall, cpu), out


def _median(times):
    return [statistics.median(t[i] for t in times) for i in (0, 1)]


def _quiet(*args, **kwargs):
    pass


def make_hook(method, pipe, prompt, targets, steps, seed, layers=None):
    """The method's one hook (regulation.editors.set_up at its authors' defaults); None for plain and for a method
    that changes the batch, not the attention (composable). Target words go to the methods that take them; the
    others read the prompt (SynGen's pairs) or LAYOUT (DenseDiffusion)."""
    from regulation.editors import set_up
    if method == "plain":
        return None
    entry = METHODS[method]
    run = set_up(method, pipe, prompt, steps, targets=targets if entry.takes_words else None, seed=seed,
                 layers=layers, layout=LAYOUT if "layout" in entry.takes else None, log=None)
    return run.hooks[0] if run.hooks else None


# ---------------------------------------------------------------------------------------------- tiny model

def tiny(args):
    from minisd.checkpoint import build_model
    from minisd.config import tiny as tiny_config
    from minisd.pipeline import Pipeline
    from regulation.editors import choose_targets
    from tools.testbed.shapes import benchmark_prompts

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
        print(f"  {m:14s} median {wall:7.2f} s wall {cpu:7.2f} s CPU   "
              f"/ plain: {ratio[0]:.2f}x wall {ratio[1]:.2f}x CPU")
    history = hooks["attend-excite"].history
    tries = {i: (h["tries"], h["gave_up"]) for i, h in history.items() if h["loss_refined"] is not None}
    print(f"  attend-excite: {len(history)} steps altered; refinement (step: tries, gave up): {tries or 'none'}")


# ---------------------------------------------------------------------------------------------- whole runs, SD 1.5

def generations(args):
    """--only sd15 --generations: whole --steps-step generations (DPM-Solver++(2M), text encoding and VAE decode
    included) of the SD 1.5 architecture with random weights at --size px, plain and regulated, interleaved, on
    --backend: the measured regulate / plain ratio, where the per-step part projects it."""
    from minisd.config import FAMILIES
    from minisd.pipeline import Pipeline
    from regulation.editors import choose_targets

    cfg = FAMILIES["tiny" if args.tiny else "sd1"]()
    size = args.size or (cfg.image_size if args.tiny else 512)
    dtype = getattr(torch, args.dtype or "bfloat16")
    pipe = Pipeline(whole_model(cfg, dtype))
    if args.backend != "eager":
        pipe.compile(args.backend)
    prompt = args.prompt or "a cat and a dog"
    targets = choose_targets(pipe.tokenizers, prompt, args.targets.split() if args.targets else None, log=_quiet)
    run = dict(steps=args.steps, sampler="dpmpp_2m", seed=args.seed, height=size, width=size)
    methods = ("plain", "regulate")

    def generate(method):
        hook = make_hook(method, pipe, prompt, targets, args.steps, args.seed)
        return pipe(prompt, hooks=[hook] if hook else [], **run)

    warm = {m: _timed(lambda: generate(m))[0][0] for m in methods}   # the first compiles
    times, images = {m: [] for m in methods}, {}
    for _ in range(args.runs):
        for m in methods:
            t, images[m] = _timed(lambda: generate(m))
            times[m].append(t)
    med = {m: _median(t) for m, t in times.items()}
    print(f"sd15 generations: SD 1.5 architecture, random weights, {str(dtype).removeprefix('torch.')}, {size} px, "
          f"{args.steps} steps dpmpp_2m, backend {args.backend}, {args.runs} interleaved runs after a warm-up "
          f"({', '.join(f'{m} {w:.0f} s' for m, w in warm.items())}), {torch.get_num_threads()} threads")
    print(f"  prompt {prompt!r}, targets {[t.word for t in targets]}")
    for m, (wall, cpu) in med.items():
        per = [a[0] / b[0] for a, b in zip(times[m], times["plain"])]
        print(f"  {m:9s} median {wall:7.2f} s wall {cpu:7.2f} s CPU   / plain: {wall / med['plain'][0]:.3f}x wall "
              f"(per run {', '.join(f'{r:.3f}' for r in per)}), {cpu / med['plain'][1]:.3f}x CPU")
    return dict(med, images=images)


# ---------------------------------------------------------------------------------------------- one step (SD 1.5, SDXL)

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


# The per-step parts: an architecture, the model it is built as, and the conditioning its UNet reads.
Part = namedtuple("Part", "family tiny_family what dtype build conditioning")


def whole_model(cfg, dtype):
    """The whole model with random weights: the prompt goes through its text encoder as in a generation."""
    from minisd.checkpoint import build_model
    model = build_model(cfg).to(dtype).eval()
    model.requires_grad_(False)   # inference: A&E differentiates with respect to the latents only
    return model


def encoded_conditioning(pipe, prompt, size, generator):
    """SD: the encoded empty negative prompt and the prompt; no vector conditioning."""
    return pipe.encode_prompts(["", prompt]), None


def unet_only_model(cfg, dtype):
    """The model with random UNet weights (tools/bench/unet's, drawn tensor by tensor, so the float32 copy of a
    bfloat16 model never exists whole) and its text encoders and VAE left on the meta device: SDXL's two text
    encoders hold 3.3 GB in float32 and would only make embeddings that random weights make meaningless anyway."""
    from minisd.model import StableDiffusion
    from tools.bench.unet import official_unet_state
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    model.unet.load_state_dict(official_unet_state(cfg.unet, dtype), strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def random_conditioning(pipe, prompt, size, generator):
    """SDXL without its text encoders: random text embeddings and pooled text in the prompt's row, zeros in the
    empty negative prompt's (as the pipeline makes it: zero_empty_negative), and the vector the pipeline makes of
    them with the micro-conditioning of a size x size image (original = target = size, crop 0, 0)."""
    cfg = pipe.cfg
    context = torch.randn(1, cfg.text.max_position_embeddings, cfg.unet.context_dim, generator=generator)
    pooled = torch.randn(1, cfg.text2.projection_dim, generator=generator)
    context, pooled = (torch.cat([torch.zeros_like(a), a]) for a in (context, pooled))
    return context, pipe.model.vector(pooled, [size, size, 0, 0, size, size])


PARTS = {
    "sd15": Part("sd1", "tiny", "SD 1.5 architecture, random weights", "bfloat16", whole_model,
                 encoded_conditioning),
    "sdxl": Part("sdxl", "tiny-sdxl", "SDXL base architecture, random UNet weights, random text conditioning",
                 "float32", unet_only_model, random_conditioning),
}
# the table's methods, and Attention Regulation again on the --regulate-layers choice
STEP_METHODS = ("plain", "regulate", "regulate-layers", *(m for m in METHODS if m != "regulate"))
# the steps of a 50-step run each method acts in (its paper's defaults); the other steps are plain
ACTIVE_STEPS = {"syngen": 25, "dense": 15, "composable": 50}
LAYOUT = "black cat:0,0,0.5,1;white dog:0.5,0,1,1"   # DenseDiffusion's regions for the default prompt


def one_block(cfg):
    """The cheaper choice `--regulate-layers` offers: one transformer block (one cross-attention layer) of the first
    default block, where SDXL's default blocks hold 10 each."""
    return f"{cfg.default_blocks()[0]}.1.transformer_blocks.0"


def per_step(part, args):
    """Build the part's model (--tiny: its tiny config) and conditioning, then time its steps (step_costs)."""
    from minisd.config import FAMILIES
    from minisd.pipeline import Pipeline, size_unit
    from regulation.editors import choose_targets
    from regulation.layers import LayerSelector

    spec = PARTS[part]
    family = spec.tiny_family if args.tiny else spec.family
    cfg = FAMILIES[family]()
    size = args.size or (cfg.image_size if args.tiny else 512)
    if size <= 0 or size % size_unit(cfg):
        raise SystemExit(f"--size must be a positive multiple of {size_unit(cfg)} for {family}, got {size}")
    dtype_name = args.dtype or spec.dtype
    # the regulate-layers row runs where its layers are known: SDXL's one block by default, SD when asked
    layers = args.regulate_layers or (one_block(cfg) if part == "sdxl" else None)
    methods = [m for m in args.methods or STEP_METHODS if m != "regulate-layers" or layers]
    if "regulate-layers" in methods:
        try:   # a misspelt layer is an error before the minute SDXL takes to build
            LayerSelector(layers, cfg)
        except ValueError as e:
            raise SystemExit(f"--regulate-layers: {e}")
    t0 = time.perf_counter()
    pipe = Pipeline(spec.build(cfg, getattr(torch, dtype_name)))
    if args.backend != "eager":
        pipe.compile(args.backend)
    print(f"{part}: {spec.what} ({family}), {dtype_name}, CPU, {size} px, {args.runs} runs, "
          f"{torch.get_num_threads()} threads (built in {time.perf_counter() - t0:.0f} s)")
    prompt = args.prompt or "a black cat and a white dog"
    targets = choose_targets(pipe.tokenizers, prompt, args.targets.split() if args.targets else None, log=_quiet)
    context, y = spec.conditioning(pipe, prompt, size, torch.Generator().manual_seed(args.seed + 1))
    print_default_layers(cfg, size)
    return step_costs(pipe, prompt, targets, context, y, size, getattr(torch, dtype_name), methods, layers, args)


def print_default_layers(cfg, size):
    """The editors regulate the blocks the rule picks at the model's own size, whatever the image size (as the
    command line does); say which, and whether the rule would pick others at the benchmark's size."""
    from dataclasses import replace
    blocks, here = cfg.default_blocks(), replace(cfg, image_size=size).default_blocks()
    same = "the same" if here == blocks else f"{', '.join(here)} (not used)"
    print(f"  default regulated blocks (ModelConfig.default_blocks at the model's {cfg.image_size} px): "
          f"{', '.join(blocks)}; the rule at {size} px picks {same}")


def step_costs(pipe, prompt, targets, context, y, size, dtype, methods, layers, args):
    """Time one step of each method on pipe's model with the conditioning (context, y: both rows of
    classifier-free guidance, the empty negative prompt first; y None for SD) and print the projected 50-step
    overhead. Returns {method: dict(wall, cpu (s, median), rss_before, peak (GiB), hook, out (the step's output))}."""
    model, cfg = pipe.model, pipe.cfg
    context, y = context.to(dtype), None if y is None else y.to(dtype)
    f = cfg.vae.downsample
    x = torch.randn(1, cfg.unet.in_channels, size // f, size // f, generator=torch.Generator().manual_seed(args.seed))
    t, guidance = 921.0, cfg.default_guidance

    def unet(latents, rows):
        n = latents.shape[0]
        return model.unet(latents.to(dtype), torch.tensor([t] * n), context[rows],
                          None if y is None else y[rows]).float()

    def plain_step():
        with torch.no_grad():
            uncond, cond = unet(torch.cat([x, x]), slice(None)).chunk(2)
        return uncond + guidance * (cond - uncond)

    def cond_unet(latents, t):
        return unet(latents, slice(1, 2))

    def regulated_step(hook):
        hook.begin_step(0, slice(1, 2))   # step 0: regulated; the conditional row is the second
        return plain_step()

    def excite_step(hook):
        hook.begin_step(1, slice(None))   # step 1: altered, not a threshold step, so no refinement
        x_new = hook.edit_latents(x, t, 1, cond_unet)
        hook.begin_step(1, slice(1, 2))
        return x_new, plain_step()

    def composable_step():   # the unconditional row and one per concept ("a black cat", "a white dog")
        with torch.no_grad():
            uncond, *conds = unet(torch.cat([x] * 3), [0, 1, 1]).chunk(3)
        return uncond + sum(guidance * (c - uncond) for c in conds)

    def step_of(method, hook):
        """What one step of the method runs: the pipeline's side door its hook takes (a latent mover's pass with
        gradient, or attention edits in the guided call); no hook: plain, or a method that changes the batch."""
        if hook is None:
            return plain_step if method == "plain" else composable_step
        return (lambda: excite_step(hook)) if hasattr(hook, "edit_latents") else (lambda: regulated_step(hook))

    results = {}
    for method in methods:
        try:
            hook = make_hook("regulate" if method == "regulate-layers" else method, pipe, prompt, targets, 50,
                             args.seed, layers=layers if method == "regulate-layers" else None)
            run = step_of(method, hook)
            model.set_hooks([hook] if hook else [])
            run()                                          # warm-up
            rss_before, reset = rss_gib("VmRSS"), peak_rss_reset()
            timed = [_timed(run) for _ in range(args.runs)]
            wall, cpu = _median([t for t, _ in timed])
            peak = rss_gib("VmHWM") if reset else None
            results[method] = dict(wall=wall, cpu=cpu, rss_before=rss_before, peak=peak, hook=hook, out=timed[-1][1])
        except ValueError as e:   # e.g. Attention Regulation's Gaussians do not fit the 2x2 maps of 64 px
            print(f"  {method}: not measured: {e}")
        finally:
            model.set_hooks([])
    print_steps(model, results, layers)
    print_projection(results)
    return results


def print_steps(model, results, layers):
    hw = {m.name: m.hw for m in model.attention_layers(cross_only=True)}
    for m, r in results.items():
        mem = (f"peak RSS {r['peak']:.2f} GiB (RSS before {r['rss_before']:.2f} GiB)" if r["peak"]
               else "peak RSS: not available")
        print(f"  {m:15s} step median {r['wall']:8.2f} s wall {r['cpu']:8.2f} s CPU   {mem}")
    for m in ("regulate", "regulate-layers"):
        if m in results:   # the layers the editor actually edited, from its history
            edited = sorted(results[m]["hook"].history)
            sizes = sorted({"x".join(map(str, hw[name])) for name in edited})
            which = f"--regulate-layers {layers}" if m == "regulate-layers" else "the default blocks"
            print(f"  {m}: {which}: {len(edited)} cross-attention layer(s) edited, maps {', '.join(sizes)}")


def print_projection(results):
    if "plain" not in results or len(results) == 1:
        return
    print("  projected 50-step overhead (ratio to 50 plain steps; wall / CPU):")
    p = [results["plain"][k] for k in ("wall", "cpu")]
    for m in ("regulate", "regulate-layers"):
        if m in results:
            r = [results[m][k] for k in ("wall", "cpu")]
            print(f"    {m:15s} (25 regulated + 25 plain) / 50 plain = "
                  + " / ".join(f"{(25 * r[k] + 25 * p[k]) / (50 * p[k]):.2f}x" for k in (0, 1)))
    for m in ("syngen", "dense", "composable"):
        if m in results:
            r, n = [results[m][k] for k in ("wall", "cpu")], ACTIVE_STEPS[m]
            print(f"    {m:15s} ({n} {m} + {50 - n} plain) / 50 plain = "
                  + " / ".join(f"{(n * r[k] + (50 - n) * p[k]) / (50 * p[k]):.2f}x" for k in (0, 1)))
    if "attend-excite" in results:
        a = [results["attend-excite"][k] for k in ("wall", "cpu")]
        least = [(25 * a[k] + 25 * p[k]) / (50 * p[k]) for k in (0, 1)]
        most = [(25 * a[k] + 25 * p[k] + 60 * (a[k] - p[k])) / (50 * p[k]) for k in (0, 1)]
        print("    attend-excite   (25 A&E + 25 plain) / 50 plain = "
              + " / ".join(f"{v:.2f}x" for v in least) + " with no refinement; "
              + " / ".join(f"{v:.2f}x" for v in most) + " if all 3 refinements hit their cap of 20 tries")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.bench methods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("tiny", "sd15", "sdxl"),
                        help="run one part (default: tiny and sd15; sdxl, 11-14 GiB, only when asked)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each method (after a warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=50, help="tiny, sd15 --generations: sampling steps")
    parser.add_argument("--weights", default=str(ROOT / "weights" / "minisd-shapes.safetensors"),
                        help="tiny: the checkpoint (a random tiny model when absent)")
    parser.add_argument("--size", type=int, help="sd15, sdxl: image side in px (default 512; with --tiny the tiny "
                                                 "config's own size)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                        help="sd15, sdxl: model dtype (default: bfloat16 for sd15, float32 for sdxl)")
    parser.add_argument("--tiny", action="store_true",
                        help="sd15, sdxl: build the architecture's tiny config (tiny, tiny-sdxl): the same code in "
                             "seconds, a check rather than a measurement")
    parser.add_argument("--methods", nargs="+", choices=STEP_METHODS,
                        help="sd15, sdxl: the steps to time (default: all; regulate-layers on sd15 only with "
                             "--regulate-layers)")
    parser.add_argument("--regulate-layers",
                        help="sd15, sdxl: the layers of the regulate-layers step, as minisd.sample takes them "
                             "(default for sdxl: one transformer block, input_blocks.7.1.transformer_blocks.0)")
    parser.add_argument("--prompt", help="default: a shapes benchmark prompt (tiny), 'a cat and a dog' "
                        "(generations), 'a black "
                        "cat and a white dog' (sd15, sdxl steps)")
    parser.add_argument("--targets", help="target words, space separated (default: the prompt's objects)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="eager", choices=("eager", "inductor", "openvino"),
                        help="sd15, sdxl: run the UNet on minisd's fast path (minisd/fast.py)")
    parser.add_argument("--generations", action="store_true",
                        help="sd15: time whole generations (--steps steps), plain and regulated, instead of steps")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    torch.set_num_threads(args.threads)
    results = {}
    if args.only in (None, "tiny") and not args.generations:
        tiny(args)
    if args.generations:
        if args.only != "sd15":
            parser.error("--generations needs --only sd15")
        return {"sd15": generations(args)}
    for part in ("sd15", "sdxl"):
        if args.only == part or (args.only is None and part == "sd15"):
            results[part] = per_step(part, args)
    return results


if __name__ == "__main__":
    main()
