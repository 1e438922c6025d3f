"""Why two methods lose on the testbed: measurements behind docs/methods.md's account.

    python -m tools.eval.why phrase-swap              # DenseDiffusion: how far the swapped phrase states move
    python -m tools.eval.why syngen-step --n 20       # SynGen: its latent step against the sampler's own move

phrase-swap: DenseDiffusion replaces the prompt's text states at each phrase's tokens by those of the phrase encoded
alone (the authors always do). For each object phrase of the 100 test prompts: |alone - in prompt| / |in prompt| at
its tokens. A large text encoder's states of "red circle" barely depend on the words around it; a 3-layer one's may.

syngen-step: over the first 25 steps (those SynGen acts in), the size of SynGen's update of the latents (step size x
its gradient) against the sampler's own move in the same step (|x_{i+1} - x_i| without that update), both as RMS
over the latent; also SynGen's loss at its first and last altered step.
"""
import argparse

import numpy as np
import torch

from minisd.checkpoint import DEFAULT_CHECKPOINT
from tools.testbed import shapes


def phrase_swap(pipe, items):
    from regulation.targets import resolve_targets
    changes, phrases = [], 0
    for item in items:
        prompt = item["prompt"]
        states = pipe.encode([prompt])[0][0]
        for colour, shape in item["objects"]:
            phrase = f"{colour} {shape}"
            target = resolve_targets(pipe.tokenizer, prompt, [phrase])[0]
            alone = pipe.encode([phrase])[0][0][1:1 + len(target.positions)]
            here = states[target.positions]
            changes += ((alone - here).norm(dim=-1) / here.norm(dim=-1)).tolist()
            phrases += 1
    c = np.array(changes)
    return {"phrases": phrases, "tokens": int(c.size), "mean": float(c.mean()), "median": float(np.median(c)),
            "p10": float(np.percentile(c, 10)), "p90": float(np.percentile(c, 90))}


def syngen_step(pipe, items, strength=None, steps=50, seed=0):
    from regulation.editors import set_up
    ratios, first, last = [], [], []
    for item in items:
        run = set_up("syngen", pipe, item["prompt"], steps, seed=seed, strength=strength, log=lambda *a: None)
        hook = run.hooks[0]
        moves, pushes, entering = {}, {}, {}
        inner = hook.edit_latents

        def edit(x, t, i, cond):   # called at the start of step i, before the model
            out = inner(x, t, i, cond)
            pushes[i] = (out.float() - x.float()).pow(2).mean().sqrt().item()
            entering[i] = out.detach().float().clone()
            return out
        hook.edit_latents = edit

        def callback(info):        # after step i: the sampler's own move is from what entered it
            i = info["i"]
            if i in entering:
                moves[i] = (info["x"].float() - entering[i]).pow(2).mean().sqrt().item()
        pipe(item["prompt"], steps=steps, seed=seed, hooks=run.hooks, callback=callback, decode=False)
        altered = [i for i in sorted(pushes) if i in moves and pushes[i] > 0]
        ratios += [pushes[i] / moves[i] for i in altered]
        losses = [hook.history[i]["loss"] for i in sorted(hook.history)]
        first.append(np.mean(losses[0]))
        last.append(np.mean(losses[-1]))
    r = np.array(ratios)
    return {"prompts": len(items), "steps": int(r.size), "push/move median": float(np.median(r)),
            "push/move mean": float(r.mean()), "loss first": float(np.mean(first)), "loss last": float(np.mean(last))}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.eval.why", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["phrase-swap", "syngen-step"])
    ap.add_argument("--n", type=int, default=100, help="test prompts (the first n of the benchmark's 100)")
    ap.add_argument("--strength", type=float, default=None, help="syngen-step: the step size (default: 20)")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from minisd.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    items = shapes.benchmark_prompts(100, 0)[:args.n]
    with torch.no_grad() if args.what == "phrase-swap" else torch.enable_grad():
        out = phrase_swap(pipe, items) if args.what == "phrase-swap" else syngen_step(pipe, items, args.strength)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
