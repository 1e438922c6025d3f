"""Is a shapes-world checkpoint a testbed on which Attention Regulation can show anything? Four gates, each a
figure, on held-out seeds:

  a  single objects: "a red circle", every (colour, shape), the strict judge (right colour on the right shape)
  b  two-object held-out prompts, plain: the strict judge finds both objects (20-80% wanted: the model draws,
     and neglect is there to fix)
  c  the words carry the meaning: condition on prompt A's word states with prompt B's end-of-text and padding
     states (two single-object prompts); does the image show A's object (the words) or B's (the padding)?
  d  attention localises where regulation acts: at the regulated layers (the model's default blocks), each
     found object's noun attends inside that object's region this many times the flat-map share (lift), and
     more than inside the other object's region; plus where the cross-attention goes (start / words / end+pad)
  f  the handle regulation pulls: gate b's prompts with a layout of their two objects written into the nouns'
     attention at the regulated layers during the first half of the steps; are both objects drawn, and where
     the layout put them? (A diagnostic beside the gates, without a goal of its own: compare with b.)

    python -m tools.testbed.diagnose --checkpoint weights/minisd-shapes.safetensors
    python -m tools.testbed.diagnose --checkpoint run/snapshot-002000.safetensors --quick --json out.json

Gate (e), the layer rule, is ModelConfig.default_blocks: one rule for every family (the deepest level of the
UNet's down and up paths that has cross-attention), fixed before the benchmark it is measured with.
"""
import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from minisd.attention import AttentionHook
from minisd.blocks import block_of
from minisd.maps import AttentionMaps
from minisd.pipeline import Pipeline
from regulation.editors import choose_targets
from tools.testbed import judge as J
from tools.testbed import shapes

GOALS = {"a": ">= 90%", "b": "20-80%", "c": ">= 80% follow the words", "d": "own lift >= 2 and > other"}
SEED0 = 50_000  # held-out seeds: training never draws noise from these


def to_uint8(image):
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def object_masks(image):
    """{(colour, shape): boolean mask} of what the strict judge sees (the largest blob of each kind)."""
    out = {}
    for colour, mask in J.components(image):
        key = (colour, J.classify(mask))
        if key not in out or mask.sum() > out[key].sum():
            out[key] = mask
    return out


def single_prompts():
    return [(shapes.phrase(c, s), (c, s)) for c in shapes.COLOURS for s in shapes.SHAPES]


def gate_a(pipe, seeds, steps, log):
    """Single objects, with where they fail: the rate per named shape, and how often the named colour is drawn at
    all (as a blob of any shape), which tells a model that has the words but not the shapes."""
    hits, shape_of, coloured = [], [], []
    for prompt, key in single_prompts():
        for k in range(seeds):
            img = to_uint8(pipe(prompt, steps=steps, seed=SEED0 + k).images[0])
            hits.append(J.judge(img, [key])[0])
            shape_of.append(key[1])
            coloured.append(any(c == key[0] for c, _ in object_masks(img)))
    by_shape = {s: float(np.mean([h for h, t in zip(hits, shape_of) if t == s])) for s in shapes.SHAPES}
    log(f"a: single objects, strict judge: {np.mean(hits):.1%} of {len(hits)}; the named colour drawn "
        f"{np.mean(coloured):.1%}; by shape: " + ", ".join(f"{s} {r:.0%}" for s, r in by_shape.items()))
    return dict(rate=float(np.mean(hits)), n=len(hits), colour_drawn=float(np.mean(coloured)), by_shape=by_shape)


def swapped_context(pipe, words_prompt, pad_prompt):
    """Words (start token included) of one prompt, end-of-text and padding states of the other, each state
    kept at its own position: the conditioning the swap test feeds the UNet."""
    ids = pipe.tokenizer([words_prompt, pad_prompt])
    ctx = pipe.model.encode_text(ids.to(pipe.device))
    eot = int((ids[0] == pipe.tokenizer.eos_id).int().argmax())
    out = ctx[1:2].clone()
    out[:, :eot] = ctx[0:1, :eot]
    return out


def gate_c(pipe, pairs, steps, log):
    """Each pair (A, B) of single objects with distinct colour and shape, both ways round."""
    words = pads = both = 0
    orig = pipe.encode_prompts
    try:
        for k, (a, b) in enumerate(pairs):
            for wa, wb in ((a, b), (b, a)):
                pa, pb = shapes.phrase(*wa), shapes.phrase(*wb)
                ctx = swapped_context(pipe, pa, pb)
                pipe.encode_prompts = lambda prompts, ctx=ctx, pa=pa: ctx if list(prompts) == [pa] else orig(prompts)
                img = to_uint8(pipe(pa, steps=steps, seed=SEED0 + k).images[0])
                has_w, has_p = J.judge(img, [wa, wb])
                # colour alone decides when the shape is unreadable: count the colour of the largest blob too
                if not (has_w or has_p):
                    dets = J.detect(img)
                    if dets:
                        has_w, has_p = dets[0].colour == wa[0], dets[0].colour == wb[0]
                words += has_w and not has_p
                pads += has_p and not has_w
                both += has_w and has_p
    finally:
        pipe.encode_prompts = orig
    n = 2 * len(pairs)
    log(f"c: swap test ({n} images): follows the words {words / n:.1%}, the padding {pads / n:.1%}, "
        f"both {both / n:.1%}")
    return dict(words=words / n, padding=pads / n, both=both / n, n=n)


def region_lift(attn, mask):
    """How many times the flat map's share of attention falls inside the region: attn (h, w) is one token's map,
    mask (H, W) an object's pixels in the image; 1 for a flat map, 1 / (region's area share) when all of it is in."""
    h, w = attn.shape
    region = F.adaptive_avg_pool2d(torch.as_tensor(mask).float()[None, None], (h, w))[0, 0]
    return float((attn / attn.sum() * region).sum() / (region.sum() / (h * w)))


def gate_bd(pipe, prompts, seeds, steps, log):
    """Plain generations of two-object held-out prompts: both found (b); attention lift at the regulated layers,
    averaged over the observed steps and layers (d); where the attention mass goes."""
    blocks = pipe.cfg.default_blocks()
    obs_steps = list(range(0, steps, max(1, steps // 10)))
    both, own, pairs, share = [], [], [], []
    for k_item, item in enumerate(prompts):
        keys = [tuple(o) for o in item["objects"]]
        targets = choose_targets(pipe.tokenizer, item["prompt"], [s for _, s in keys], log=lambda *_: None)
        eot = int((pipe.tokenizer([item["prompt"]])[0] == pipe.tokenizer.eos_id).int().argmax())
        positions = list(range(77))  # every position: the targets' maps, and the split of the attention mass
        for k in range(seeds):
            maps = AttentionMaps(positions, obs_steps, blocks)
            img = to_uint8(pipe(item["prompt"], steps=steps, seed=SEED0 + 1000 + k, hooks=[maps]).images[0])
            found = J.judge(img, keys)
            both.append(all(found))
            m = torch.stack(list(maps.result().values())).mean(0)[0]   # (77, h, w), each query's row sums to 1
            total = m.sum(0).mean()
            share.append([float(m[0].mean() / total), float(m[1:eot].sum(0).mean() / total),
                          float(m[eot:].sum(0).mean() / total)])
            masks = object_masks(img)
            # every found object's noun: lift in its own region; where the other object was found too, in its
            # region as well (a model that rarely draws both still shows whether its maps localise)
            for i, key in enumerate(keys):
                if key not in masks:
                    continue
                noun = m[targets[i].positions].sum(0)
                lift = {kk: region_lift(noun, masks[kk]) for kk in (key, keys[1 - i]) if kk in masks}
                own.append(lift[key])
                if keys[1 - i] in lift:
                    pairs.append((lift[key], lift[keys[1 - i]]))
    share = np.mean(share, 0)
    pairs = np.array(pairs).reshape(-1, 2)
    res = dict(both=float(np.mean(both)), n=len(both), lift_own=float(np.median(own)) if own else None, n_lift=len(own),
               lift_own_pairs=float(np.median(pairs[:, 0])) if len(pairs) else None,
               lift_other=float(np.median(pairs[:, 1])) if len(pairs) else None, n_pairs=len(pairs),
               own_beats_other=float(np.mean(pairs[:, 0] > pairs[:, 1])) if len(pairs) else None,
               attention_start=float(share[0]), attention_words=float(share[1]), attention_end_pad=float(share[2]),
               blocks=list(blocks))
    log(f"b: two-object held-out prompts, plain, both found: {res['both']:.1%} of {res['n']}")
    if own:
        log(f"d: at {', '.join(blocks)}: noun lift in its own object {res['lift_own']:.2f} "
            f"(median of {len(own)} found objects)")
    else:
        log("d: no image showed a prompt's object, so no region to measure attention in")
    if len(pairs):
        log(f"   where both were found: own {res['lift_own_pairs']:.2f}, other {res['lift_other']:.2f} (medians of "
            f"{len(pairs)}); own > other in {res['own_beats_other']:.0%}")
    log(f"   cross-attention mass: start {share[0]:.1%}, words {share[1]:.1%}, end-of-text + padding {share[2]:.1%}")
    return res


class LayoutHook(AttentionHook):
    """Writes a layout into the nouns' cross-attention (tools.testbed.train.inject_layout: inside each object's
    region its
    noun takes 0.9 of the row) at the regulated blocks, in the conditional half, during the steps regulation
    edits (the first half): the most direct form of what regulation does, with the regions given."""

    def __init__(self, columns, masks, blocks, edit_steps):
        self.columns, self.masks, self.edit_steps = columns, masks, edit_steps
        self.blocks = set(blocks)

    def wants(self, layer):
        return layer.is_cross and self.step < self.edit_steps and block_of(layer.name) in self.blocks

    def edit_probs(self, layer, logits, probs):
        from tools.testbed.train import inject_layout
        out = probs.clone()
        cond = probs[self.cond]
        out[self.cond] = inject_layout(cond, self.columns.expand(cond.shape[0], -1, -1),
                                       self.masks.expand(cond.shape[0], -1, -1, -1))
        return out


def gate_f(pipe, prompts, seeds, steps, log):
    """The handle regulation pulls: the same two-object prompts as gate b, each with a random layout of its two
    objects (a scene the renderer places) written into the nouns' attention at the regulated layers during the
    first half of the steps. Both found, and both found where the layout put them, against gate b's plain rate.
    Stable Diffusion has this handle (editing its early cross-attention maps moves and brings back objects:
    Prompt-to-Prompt, Directed Diffusion); a testbed without it cannot show what regulation does."""
    from tools.testbed.train import noun_columns
    blocks = pipe.cfg.default_blocks()
    res = pipe.cfg.image_size // pipe.cfg.vae.downsample
    found_both = placed_both = 0
    n = 0
    for k_item, item in enumerate(prompts):
        keys = [tuple(o) for o in item["objects"]]
        columns = noun_columns(pipe.tokenizer, [(item["prompt"], keys)])
        for k in range(seeds):
            scene = shapes.sample_scene(np.random.default_rng(SEED0 + 7919 * k_item + k), keys=keys)
            masks = torch.zeros(1, 3, res, res)
            masks[0, :2] = torch.as_tensor(shapes.object_masks(scene, res, pipe.cfg.image_size))
            hook = LayoutHook(columns, masks, blocks, steps // 2)
            img = to_uint8(pipe(item["prompt"], steps=steps, seed=SEED0 + 1000 + k, hooks=[hook]).images[0])
            found = object_masks(img)
            full = shapes.object_masks(scene, pipe.cfg.image_size, pipe.cfg.image_size) > 0.5
            found_both += all(key in found for key in keys)
            placed_both += all(key in found and (found[key] & full[i]).sum() >= 0.5 * found[key].sum()
                               for i, key in enumerate(keys))
            n += 1
    res = dict(both=found_both / n, placed=placed_both / n, n=n)
    log(f"f: a layout written into the nouns' attention at {', '.join(blocks)}: both found {res['both']:.1%}, "
        f"both where the layout put them {res['placed']:.1%} of {n}")
    return res


def diagnose(checkpoint, steps=50, seeds_a=2, n_two=30, seeds_b=2, n_swap=20, handle=True, log=print):
    torch.manual_seed(0)
    pipe = Pipeline.from_checkpoint(checkpoint)
    t0 = time.time()
    out = {"checkpoint": str(checkpoint), "steps": steps}
    out["a"] = gate_a(pipe, seeds_a, steps, log)
    rng = np.random.default_rng(7)
    objs = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    pairs = []
    while len(pairs) < n_swap:
        a, b = (objs[i] for i in rng.choice(len(objs), 2, replace=False))
        if a[0] != b[0] and a[1] != b[1]:
            pairs.append((a, b))
    out["c"] = gate_c(pipe, pairs, steps, log)
    two = shapes.benchmark_prompts(n_two, seed=99)
    out["bd"] = gate_bd(pipe, two, seeds_b, steps, log)
    if handle:
        out["f"] = gate_f(pipe, two, seeds_b, steps, log)
    out["seconds"] = time.time() - t0
    out["pass"] = {"a": out["a"]["rate"] >= 0.9, "b": 0.2 <= out["bd"]["both"] <= 0.8,
                   "c": out["c"]["words"] >= 0.8,
                   "d": bool(out["bd"]["lift_own"] and out["bd"]["lift_own"] >= 2 and out["bd"]["n_pairs"]
                             and out["bd"]["lift_own_pairs"] > out["bd"]["lift_other"])}
    log("gates: " + ", ".join(f"{g} {'pass' if ok else 'FAIL'} ({GOALS[g]})" for g, ok in out["pass"].items()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.testbed.diagnose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="weights/minisd-shapes.safetensors")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds-a", type=int, default=2, help="seeds per single-object prompt (36 prompts)")
    ap.add_argument("--two", type=int, default=30, help="two-object held-out prompts for gates b and d")
    ap.add_argument("--seeds-b", type=int, default=2)
    ap.add_argument("--swap", type=int, default=20, help="pairs for the swap test (each both ways)")
    ap.add_argument("--quick", action="store_true", help="fewer images: 1 seed, 12 two-object prompts, 10 pairs")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-handle", action="store_true", help="leave out diagnostic f (the layout written in)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds_a, args.two, args.seeds_b, args.swap = 1, 12, 1, 10
    out = diagnose(args.checkpoint, args.steps, args.seeds_a, args.two, args.seeds_b, args.swap,
                   handle=not args.no_handle)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
