"""Is a tiny SD 3.5 of the shapes world (tools/testbed/train_sd3.py) a testbed for regulating joint attention, and
in which joint blocks do its words localise? On held-out seeds, plain runs:

  a  single objects: "a red circle", every (colour, shape), the strict judge (>= 90% wanted)
  b  two-object held-out prompts: the strict judge finds both (25-70% wanted) and presence (every named shape)
  d  per joint block and step band: each noun's image-to-text map, renormalised over the text keys and averaged
     over heads, with its CLIP and T5 columns summed (one map per word), and the share of that map inside the
     noun's own object (as the judge found it) against inside the other named object; a flat map puts the
     object's area share there. Also each block's text share (the mass an image query gives the text keys) and
     the CLIP / T5 split of a noun's mass.

    python -m tools.testbed.diagnose_sd3 --checkpoint weights/minisd-shapes-sd3.safetensors --json out.json
"""
import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from minisd.attention import AttentionHook
from minisd.pipeline_sd3 import SD3Pipeline
from regulation.editors import set_up
from regulation.joint_regulation import CLIP_TOKENS, resolve_joint_targets
from tools.testbed import judge as J
from tools.testbed import shapes
from tools.testbed.diagnose import SEED0, gate_a, object_masks, to_uint8

BANDS = 3   # early, middle and late thirds of the steps


class BlockMaps(AttentionHook):
    """Per joint block and step band, the conditional rows' image-to-text attention of the given words: `maps[block,
    band]` (words, h, w) summed over the band's steps, renormalised over the text keys, mean over heads; `clip` the
    share of each word's renormalised mass on its CLIP columns; `text_share[block, band]` the mean text mass of an
    image query in the joint softmax."""
    understands_joint = True

    def __init__(self, words, steps):
        self.words, self.steps = words, steps   # words: [(clip columns, T5 columns as text keys)]
        self.maps, self.clip, self.text_share, self.count = {}, {}, {}, {}

    def wants(self, layer):
        return getattr(layer, "joint", False) and not torch.is_grad_enabled()

    def edit_probs(self, layer, logits, probs):
        h, w = layer.hw
        n_text = layer.text_keys.stop
        p = probs[self.cond].float()                                     # (b, heads, hw, text + 1)
        text = p[..., :n_text]
        share = text.sum(-1, keepdim=True)
        text = text / share
        key = (int(layer.name.rsplit(".", 1)[-1]), min(BANDS - 1, self.step * BANDS // self.steps))
        clip_cols = [c for c, _ in self.words]
        cols = [c + t for c, t in self.words]
        m = torch.stack([text[..., c].sum(-1) for c in cols], 1).mean(2)    # (b, words, hw)
        cl = torch.stack([text[..., c].sum(-1) for c in clip_cols], 1).mean(2).sum(-1)
        self.maps[key] = self.maps.get(key, 0) + m.reshape(m.shape[0], -1, h, w)
        self.clip[key] = self.clip.get(key, 0) + cl / m.sum(-1).clamp_min(1e-12)
        self.text_share[key] = self.text_share.get(key, 0) + float(share.mean())
        self.count[key] = self.count.get(key, 0) + 1
        return probs


def inside(m, mask):
    """Share of the map m (h, w) that falls in the object's pixels `mask` (H, W)."""
    h, w = m.shape
    region = F.adaptive_avg_pool2d(torch.as_tensor(mask).float()[None, None], (h, w))[0, 0]
    return float((m / m.sum() * region).sum()), float(region.mean())


def gate_bd(pipe, prompts, seeds, steps, log, regulate=False):
    """Gates b and d on plain runs; with `regulate`, the same images regulated (Attention Regulation at its
    defaults, the nouns as targets) with the maps read after the edit: the text share it leaves (question b)."""
    depth = pipe.cfg.mmdit.depth
    both, present = [], []
    own = {(b, s): [] for b in range(depth) for s in range(BANDS)}
    other = {k: [] for k in own}
    area = []
    clip_share, text_share = {k: [] for k in own}, {k: [] for k in own}
    for item in prompts:
        keys = [tuple(o) for o in item["objects"]]
        targets = resolve_joint_targets(pipe, item["prompt"], [s for _, s in keys], log=None)
        words = [(t.clip, [CLIP_TOKENS + q for q in t.t5]) for t in targets]
        for k in range(seeds):
            hook = BlockMaps(words, steps)
            hooks = [hook]
            if regulate:   # the editor first: the maps are read from the probabilities it leaves
                hooks = set_up("regulate", pipe, item["prompt"], steps, targets=targets, seed=SEED0 + 1000 + k,
                               log=None).hooks + hooks
            img = to_uint8(pipe(item["prompt"], steps=steps, seed=SEED0 + 1000 + k, hooks=hooks).images[0])
            found = J.judge(img, keys)
            both.append(all(found))
            masks = object_masks(img)
            seen = {shape for _, shape in masks}
            present.append(all(s in seen for _, s in keys))
            for key_, n in hook.count.items():
                clip_share[key_].append(float((hook.clip[key_] / n).mean()))
                text_share[key_].append(hook.text_share[key_] / n)
                m = hook.maps[key_][0] / n
                for i, obj in enumerate(keys):
                    if obj not in masks:
                        continue
                    s, a = inside(m[i], masks[obj])
                    own[key_].append(s)
                    if key_ == (0, 0):
                        area.append(a)
                    if keys[1 - i] in masks:
                        other[key_].append(inside(m[i], masks[keys[1 - i]])[0])
    table = []
    for b in range(depth):
        for s in range(BANDS):
            k = (b, s)
            table.append(dict(block=b, band=s, own=float(np.median(own[k])) if own[k] else None,
                              other=float(np.median(other[k])) if other[k] else None, n_own=len(own[k]),
                              n_other=len(other[k]), clip_share=float(np.mean(clip_share[k])),
                              text_share=float(np.mean(text_share[k]))))
    res = dict(both=float(np.mean(both)), presence=float(np.mean(present)), n=len(both),
               object_area=float(np.median(area)) if area else None, blocks=table)
    log(f"b: two-object held-out prompts, {'regulated' if regulate else 'plain'}: both found (strict) "
        f"{res['both']:.1%}, presence {res['presence']:.1%} of {res['n']}")
    log(f"d: share of a noun's map (text-renormalised, CLIP + T5 columns) inside its own object / inside the other "
        f"(a flat map: the object's area, median {res['object_area'] or 0:.1%}); text share; CLIP's part of the noun")
    log(" block  band   own    other   text share  CLIP part")
    for r in table:
        log(f" {r['block']:>5}  {r['band']:>4}  {r['own'] or 0:5.1%}  {r['other'] or 0:6.1%}  {r['text_share']:9.1%}"
            f"  {r['clip_share']:8.1%}")
    return res


def diagnose(checkpoint, steps=50, seeds_a=2, n_two=30, seeds_b=2, regulate=False, log=print):
    torch.manual_seed(0)
    pipe = SD3Pipeline.from_checkpoint(checkpoint)
    t0 = time.time()
    out = {"checkpoint": str(checkpoint), "steps": steps}
    out["a"] = gate_a(pipe, seeds_a, steps, log)
    out["bd"] = gate_bd(pipe, shapes.benchmark_prompts(n_two, seed=99), seeds_b, steps, log)
    if regulate:
        out["bd_regulated"] = gate_bd(pipe, shapes.benchmark_prompts(n_two, seed=99), seeds_b, steps, log, True)
    out["seconds"] = time.time() - t0
    out["pass"] = {"a": out["a"]["rate"] >= 0.9, "b": 0.25 <= out["bd"]["presence"] <= 0.7}
    log("gates: " + ", ".join(f"{g} {'pass' if ok else 'FAIL'}" for g, ok in out["pass"].items()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.testbed.diagnose_sd3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="weights/minisd-shapes-sd3.safetensors")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds-a", type=int, default=2, help="seeds per single-object prompt (36 prompts)")
    ap.add_argument("--two", type=int, default=30, help="two-object held-out prompts for gates b and d")
    ap.add_argument("--seeds-b", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer images: 1 seed, 12 two-object prompts")
    ap.add_argument("--regulate", action="store_true", help="also b and d with Attention Regulation on (its "
                    "defaults, the nouns as targets): the text share the edit leaves in each block")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds_a, args.two, args.seeds_b = 1, 12, 1
    out = diagnose(args.checkpoint, args.steps, args.seeds_a, args.two, args.seeds_b, args.regulate)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
