"""The CLIP score of the shapes world: the paper's CLIP column, in miniature.

The Attention Regulation paper scores each image by the cosine between CLIP's image embedding of it and CLIP's
text embedding of the prompt. The shapes world's CLIP is the tiny one whose text tower minisd-shapes froze
(tools/testbed/tinyclip.py); its image tower was thrown away after that training. This tool trains a new image
tower (and the text projection) against that frozen text tower, on renders passed through the shipped model's VAE
(so that it sees what generated images look like), each caption against its hard negatives as before, and ships
it as `weights/tinyclip-image.safetensors`. The text tower is read from the checkpoint, never copied.

    python -m tools.testbed.clipscore train                 # about 10 minutes on 2 cores; writes the weights
    python -m tools.testbed.clipscore check --n 200         # on generated images: true prompt vs hard negatives

`ClipScore` is a scorer for the benchmark:
`python -m tools.eval --judge tools.testbed.judge:ShapesJudge,tools.testbed.clipscore:ClipScore`.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minisd.checkpoint import DEFAULT_CHECKPOINT, file_hash
from tools.testbed import shapes, tinyclip

WEIGHTS = DEFAULT_CHECKPOINT.parent / "tinyclip-image.safetensors"
SIZE = 64   # the image tower's input side; images are box-filtered down to it


def to_tower(images):
    """uint8 images (b, H, W, 3) or (H, W, 3) -> the tower's input (b, 3, 64, 64) in [-1, 1] (box filter down)."""
    x = torch.as_tensor(np.asarray(images))
    x = (x[None] if x.dim() == 3 else x).permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.adaptive_avg_pool2d(x, SIZE) if x.shape[-1] != SIZE else x


def build(checkpoint=DEFAULT_CHECKPOINT):
    """(TinyCLIP with the checkpoint's frozen text tower and a fresh image tower and projection, tokenizer)."""
    from minisd.loading import load_model
    from minisd.tokenizer import Tokenizer
    model = load_model(checkpoint)
    text = model.cond_stage_model.float().eval().requires_grad_(False)
    tok = Tokenizer(pad_with_eot=model.cfg.text.pad_with_eot)
    return tinyclip.TinyCLIP(text, tok.eos_id), tok, model


def trainable(clip):
    """What this tool trains and ships: everything but the text tower."""
    return {k: v for k, v in clip.state_dict().items() if not k.startswith("text.")}


def load(path=WEIGHTS, checkpoint=DEFAULT_CHECKPOINT):
    """The tiny CLIP: the checkpoint's text tower and the shipped image tower; refuses a tower trained against
    another checkpoint's text tower (the embeddings would not match)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train it with python -m tools.testbed.clipscore train")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    want = file_hash(checkpoint)
    if meta.get("text_checkpoint") != want:
        raise ValueError(f"{path} was trained against text tower {meta.get('text_checkpoint')}, not {checkpoint} "
                         f"({want}); train it again")
    clip, tok, _ = build(checkpoint)
    state = load_file(str(path))
    missing = sorted(set(trainable(clip)) - set(state))
    extra = sorted(set(state) - set(trainable(clip)))
    if missing or extra:
        raise ValueError(f"{path}: missing {missing}, unexpected {extra}")
    clip.load_state_dict({**clip.state_dict(), **state})
    return clip.eval(), tok, meta


class ClipScore:
    """Scorer for tools.eval: {"clip": cosine of the image's and the prompt's embeddings} (the paper's CLIP score,
    before its x100 or x2.5 scalings some papers apply)."""

    def __init__(self, path=WEIGHTS, checkpoint=DEFAULT_CHECKPOINT):
        self.clip, self.tok, meta = load(path, checkpoint)
        self.settings = f"tinyclip-image={file_hash(path)}"
        self._text = {}

    @torch.no_grad()
    def text(self, prompt):
        if prompt not in self._text:
            self._text[prompt] = self.clip.encode_text(self.tok([prompt]))[0]
        return self._text[prompt]

    @torch.no_grad()
    def scores(self, image, prompt, objects=None):
        return {"clip": float(self.clip.encode_image(to_tower(image))[0] @ self.text(prompt))}


# ----------------------------------------------------------------------------------------------------------
# training

def vae_round_trip(model, images, batch=64):
    """uint8 renders (n, H, W, 3) -> the same scenes as the VAE gives them back (uint8): generated images are VAE
    decodes, with their blur and colour shifts, and the tower should be used to that."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 255
            y = model.decode_latents(model.first_stage_model.encode(x * 2 - 1).mean * model.cfg.vae.scale_factor)
            out.append((y.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    return np.concatenate(out)


def train(args):
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    clip, tok, model = build(args.checkpoint)
    rng = np.random.default_rng(args.seed)
    shapes.SUPERSAMPLE = 2
    scenes = [shapes.sample_scene(rng) for _ in range(args.pool)]        # training pairs only, as the text tower's
    renders = np.stack([shapes.render(s, 128) for s in tqdm(scenes, desc="render", leave=False)])
    images = to_tower(vae_round_trip(model, renders))
    objs = [[o.key for o in s.objects] for s in scenes]
    params = [p for n, p in clip.named_parameters() if not n.startswith("text.")]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    start = time.time()
    clip.image.train()
    bar = tqdm(range(args.steps), desc="image tower")
    for step in bar:
        idx = rng.integers(0, len(images), args.batch)
        caps, negs = zip(*[tinyclip.caption_and_negatives(objs[k], rng) for k in idx])
        ids, neg_ids = tok(list(caps)), tok([n for ns in negs for n in ns])
        n = int(max((ids == clip.eot_id).int().argmax(1).max(), (neg_ids == clip.eot_id).int().argmax(1).max())) + 1
        for group in opt.param_groups:
            warmup, cosine = min(1.0, (step + 1) / 100), 1 + math.cos(math.pi * step / args.steps)
            group["lr"] = args.lr * warmup * (0.1 + 0.9 * 0.5 * cosine)
        flip = torch.rand(len(idx)) < 0.5   # mirror images: captions do not say left or right
        batch = torch.where(flip[:, None, None, None], images[idx].flip(-1), images[idx])
        loss, acc = tinyclip.contrastive_loss(clip, batch, ids[:, :n], neg_ids[:, :n])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
    seconds = time.time() - start
    clip.eval()
    held_out = tinyclip.evaluate(clip, tok, n=200)
    from safetensors.torch import save_file
    meta = {"text_checkpoint": file_hash(args.checkpoint), "training": json.dumps(vars(args)),
            "seconds": f"{seconds:.0f}", "held_out_renders": json.dumps(held_out)}
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    save_file({k: v.contiguous() for k, v in trainable(clip).items()}, str(tmp), metadata=meta)
    tmp.replace(out)
    print(f"wrote {out} ({seconds:.0f} s); held-out renders, true caption beats its hard negatives: {held_out}")


# ----------------------------------------------------------------------------------------------------------
# the check the table relies on

def negatives(objects):
    """The hard negatives of a two-object prompt's objects, each kind once, in the prompt's own words:
    (kind, objects) for colours swapped, the second object's shape changed, its colour changed."""
    keys = [tuple(o) for o in objects]
    return [("swap", tinyclip.colours_swapped(keys, 0, 1)),
            ("shape", tinyclip.shape_changed(keys, 1, tinyclip.other_shapes(keys)[0])),
            ("colour", tinyclip.colour_changed(keys, 1, tinyclip.other_colours(keys)[0]))]


def reword(prompt, objects, other):
    """The prompt with each named object's words replaced by `other`'s, in place (the template kept)."""
    out = prompt
    marks = [f"\0{i}\0" for i in range(len(objects))]
    for (c, s), m in zip(objects, marks):
        out = out.replace(shapes.phrase(c, s), m, 1)
    for (c, s), m in zip(other, marks):
        out = out.replace(m, shapes.phrase(c, s))
    return out


def check(args):
    """On generated images: for plain images the judge calls exact (every object in its colour, nothing else), how
    often the true prompt scores above each of its hard negatives (and above all of them). Also the same on the
    images that fail, as a contrast: their scores should sit lower."""
    from minisd.pipeline import Pipeline
    from tools.testbed import judge
    if args.threads:
        torch.set_num_threads(args.threads)
    scorer = ClipScore(args.weights, args.checkpoint)
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    items = shapes.benchmark_prompts(args.n, args.prompt_seed)
    wins, kinds, exact_scores, failed_scores = [], {}, [], []
    for item in tqdm(items, desc="check"):
        objects = [tuple(o) for o in item["objects"]]
        image = np.asarray(pipe(item["prompt"], seed=args.seed).images[0].convert("RGB"))
        img = scorer.clip.encode_image(to_tower(image))[0]
        true = float(img @ scorer.text(item["prompt"]))
        exact = judge.exact(judge.failure_types(image, objects))
        (exact_scores if exact else failed_scores).append(true)
        if not exact:
            continue
        beats = []
        for kind, other in negatives(objects):
            win = true > float(img @ scorer.text(reword(item["prompt"], objects, other)))
            kinds.setdefault(kind, []).append(win)
            beats.append(win)
        wins.append(all(beats))
    result = {"images": len(items), "exact": len(wins), "beats_all": float(np.mean(wins)) if wins else None,
              **{k: float(np.mean(v)) for k, v in kinds.items()},
              "clip_exact": float(np.mean(exact_scores)) if exact_scores else None,
              "clip_not_exact": float(np.mean(failed_scores)) if failed_scores else None}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.testbed.clipscore", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the image tower against the checkpoint's frozen text tower")
    t.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    t.add_argument("--out", default=str(WEIGHTS))
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--pool", type=int, default=4000, help="training scenes (rendered, VAE round trip)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    c = sub.add_parser("check", help="does it rank a correct generated image's prompt above its hard negatives?")
    c.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    c.add_argument("--weights", default=str(WEIGHTS))
    c.add_argument("--n", type=int, default=200, help="benchmark prompts (one plain image each)")
    c.add_argument("--prompt-seed", type=int, default=7, help="prompt order (the test set uses 0)")
    c.add_argument("--seed", type=int, default=100, help="image seed (the test set uses 0..3)")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--out", default=None, help="write the result as JSON")
    args = ap.parse_args(argv)
    return train(args) if args.command == "train" else check(args)


if __name__ == "__main__":
    main()
