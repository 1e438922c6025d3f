"""The semantic-fidelity benchmark: how often does each method draw every object that a prompt names?

Object neglect (Chefer et al., "Attend-and-Excite", SIGGRAPH 2023): a prompt names two things, the image shows one.
Attention Regulation (Zhang et al., ECCV 2024, arXiv 2403.06381) edits the cross-attention to fight it. For each
prompt and seed this draws the plain image once, then each method's image from the same seed, asks a judge which
named objects each image shows, and measures how far each method's image drifts from the plain one and what it costs.

    python -m tools.evaluate                                   # 120 held-out prompts x 4 seeds, plain vs regulate
    python -m tools.evaluate --limit 8 --seeds 1 --steps 20 --out /tmp/eval   # a quick look
    python -m tools.evaluate --prompts mine.jsonl --judge my_detector:Judge --checkpoint sd15.safetensors

Writes OUT/results.csv (one row per prompt x seed x method; the same command run again skips the rows already
there), OUT/table.md and OUT/examples.png, and prints the table.
"""
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
import argparse
import csv
import importlib
import json
import re
import shlex
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from minisd.maps import AttentionMaps, grid, word_maps
from minisd.sample import DEFAULT_CHECKPOINT, file_hash
from regulation.editors import choose_targets, make_editor
from regulation.targets import auto_targets, is_adjective
from tools import shapes

TARGET_MODES = ("nouns", "attr+nouns")
COLUMNS = ["prompt_id", "seed", "method", "prompt", "objects", "targets", "found", "all_found", "recall", "swap",
           "mad", "ssim", "seconds", "settings"]
DEFINITIONS = """\
- detection: share of images in which the judge finds every named object (shapes: the right colour on the right shape).
- object recall: share of named objects found.
- binding: share of images with no attribute swap, over prompts that name two or more (attribute, noun) objects.
  A swap: a named noun is seen with another named object's attribute ("a red circle and a blue square": a blue
  circle or a red square). The judge is asked about these swapped objects as about the named ones.
- fixed / broke: images where plain missed an object and the method found all / plain found all and the method did not.
- MAD, SSIM: the method's image against plain's of the same prompt and seed: mean absolute difference of pixels
  in [0, 1], and SSIM (Wang et al. 2004) of the grey (BT.601 luma) images over 7x7 uniform windows.
- s / image: wall-clock seconds from prompt to decoded image (one image per call); overhead: against plain."""


@dataclass
class Variant:
    name: str      # as in the table: "plain", "regulate[nouns]"
    method: str    # "plain" or a method of regulation.editors
    targets: str   # one of TARGET_MODES ("" for plain)


@dataclass
class Settings:
    steps: int
    guidance: float
    size: int
    layers: str = None
    edit_steps: int = None


@dataclass
class Unit:
    """What one prompt x seed gives: a CSV row per variant, the images, and {variant: (words, maps)} on request."""
    rows: list
    images: dict
    maps: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# prompts, methods, targets, judge

def load_prompts(path=None, n=120, seed=0):
    """[dict(prompt=..., objects=[(attribute, noun) or "phrase", ...] or None)]: the held-out shapes prompts, a
    JSONL file of such dicts, or a text file of one prompt per line (objects unknown)."""
    if path is None:
        return [dict(prompt=d["prompt"], objects=[tuple(o) for o in d["objects"]]) for d in shapes.benchmark_prompts(n, seed)]
    lines = [(i, ln.strip()) for i, ln in enumerate(Path(path).read_text().splitlines(), 1)]
    lines = [(i, ln) for i, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    if not lines[0][1].startswith("{"):
        return [dict(prompt=ln, objects=None) for _, ln in lines]
    items = []
    for i, ln in lines:
        try:
            d = json.loads(ln)
        except json.JSONDecodeError:
            d = None
        objs = d.get("objects") if isinstance(d, dict) else None
        if not (isinstance(d, dict) and isinstance(d.get("prompt"), str) and isinstance(objs or [], list)
                and all(isinstance(o, (str, list)) for o in objs or [])):
            raise ValueError(f'{path}:{i}: expected one JSON object per line, like {{"prompt": "a red circle and a '
                             f'blue square", "objects": [["red", "circle"], ["blue", "square"]]}}')
        items.append(dict(prompt=d["prompt"], objects=[tuple(o) if isinstance(o, list) else o for o in objs]
                          if objs else None))
    return items


def parse_variants(methods, targets):
    """"plain,regulate" and "both" -> plain, regulate[nouns], regulate[attr+nouns]. Plain always runs: the drift
    is measured against it."""
    from regulation.editors import METHODS
    modes = TARGET_MODES if targets == "both" else (targets,)
    if not set(modes) <= set(TARGET_MODES):
        raise ValueError(f"--targets must be one of {', '.join(TARGET_MODES)} or both, got {targets!r}")
    names = [m.strip() for m in methods.split(",") if m.strip() not in ("", "plain")]
    for m in names:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from plain, {', '.join(METHODS)}")
    return [Variant("plain", "plain", "")] + [Variant(f"{m}[{t}]", m, t) for m in dict.fromkeys(names) for t in modes]


def target_words(item, mode):
    """Words to regulate. Known objects, each an (attribute, noun) pair or a phrase like "red circle": each one's
    noun, its last word ("nouns"), or all its words ("attr+nouns"). Unknown objects: the nouns that
    regulation.targets.auto_targets picks, and for attr+nouns also the prompt's adjectives, in prompt order.
    A repeated word becomes "red", "red#2": how regulation.targets.resolve_targets picks an occurrence."""
    if item["objects"]:
        phrases = [o.split() if isinstance(o, str) else list(o) for o in item["objects"]]
        words = [w for ph in phrases for w in (ph[-1:] if mode == "nouns" else ph)]
    else:
        nouns = {n.split("#")[0] for n in auto_targets(item["prompt"])}
        words = [w for w in re.findall(r"[^\W_]+(?:-[^\W_]+)*", item["prompt"].lower())
                 if w in nouns or (mode == "attr+nouns" and is_adjective(w))]
    seen = {}
    for i, w in enumerate(words):
        seen[w] = seen.get(w, 0) + 1
        words[i] = w if seen[w] == 1 else f"{w}#{seen[w]}"
    return words


def load_judge(spec):
    """"module:attr" -> a Judge (see tools.judge); a class is instantiated with no arguments. A judge may also
    have `objects_for(prompt)`, to judge the prompts of a text file, whose objects are not given."""
    mod, _, attr = spec.rpartition(":")
    if not mod or not attr:
        raise ValueError(f"--judge must look like module:attr, got {spec!r}")
    module = importlib.import_module(mod)
    if not hasattr(module, attr):
        raise ValueError(f"--judge {spec}: {mod} has no {attr!r}")
    obj = getattr(module, attr)
    obj = obj() if isinstance(obj, type) else obj
    if not callable(obj):
        raise ValueError(f"--judge {spec}: {obj!r} is not callable as judge(image, objects) -> [bool]")
    return obj


def judge_image(judge, image, objects):
    """(found, one bool per named object; swap, whether a named noun is seen with another named object's
    attribute, None below two pairs). The judge gets the named objects and the swapped ones in one call."""
    if not objects:
        return None, None
    pairs = len(objects) >= 2 and all(isinstance(o, tuple) and len(o) == 2 for o in objects)
    swaps = list(dict.fromkeys((a, n) for _, n in objects for a, _ in objects if (a, n) not in objects)) if pairs else []
    verdict = list(judge(np.asarray(image.convert("RGB")), list(objects) + swaps))
    if len(verdict) != len(objects) + len(swaps):
        raise ValueError(f"the judge gave {len(verdict)} answers for {len(objects) + len(swaps)} objects")
    return [bool(v) for v in verdict[:len(objects)]], (any(verdict[len(objects):]) if pairs else None)


# ----------------------------------------------------------------------------------------------------------
# drift

def ssim(a, b, win=7):
    """SSIM (Wang et al. 2004) of two grey images in [0, 1]: local means, variances and covariance over win x win
    uniform windows (box sums from an integral image), averaged over the windows that fit inside the image."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def box(x):  # (h, w) -> (h - win + 1, w - win + 1) window means
        s = np.pad(x, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        return (s[win:, win:] - s[:-win, win:] - s[win:, :-win] + s[:-win, :-win]) / win ** 2
    ma, mb = box(a), box(b)
    va, vb, cov = box(a * a) - ma * ma, box(b * b) - mb * mb, box(a * b) - ma * mb
    return float((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))).mean())


def drift(image, reference):
    """(mean absolute pixel difference in [0, 1], SSIM of the grey images: BT.601 luma)."""
    x, y = (np.asarray(i.convert("RGB"), dtype=np.float64) / 255.0 for i in (image, reference))
    luma = np.array([0.299, 0.587, 0.114])
    return float(np.abs(x - y).mean()), ssim(x @ luma, y @ luma)


# ----------------------------------------------------------------------------------------------------------
# the work of one prompt x seed

def generate(pipe, prompt, seed, s, hooks=()):
    t = time.perf_counter()
    image = pipe(prompt, steps=s.steps, guidance=s.guidance, seed=seed, height=s.size, width=s.size,
                 hooks=hooks).images[0]
    return image, time.perf_counter() - t


def evaluate_one(pipe, item, seed, variants, judge, s, want_maps=False, on_image=lambda: None):
    """Plain once, then each variant from the same seed; judge each image and measure its drift from plain.
    With want_maps, when plain missed an object (or the objects are unknown), the regulated runs also record
    their targets' cross-attention at step steps // 4 (minisd.maps, after the edit), for examples.png."""
    prompt, objects = item["prompt"], item["objects"]
    rows, images, maps, plain_found = [], {}, {}, None
    for v in variants:
        hooks, observer, targets = [], None, []
        if v.method != "plain":
            targets = choose_targets(pipe.tokenizer, prompt, target_words(item, v.targets), log=lambda *a: None)
            hooks.append(make_editor(v.method, pipe, prompt, targets, s.steps, seed=seed, layers=s.layers,
                                     edit_steps=s.edit_steps))
            if want_maps and not (plain_found and all(plain_found)):
                observer = AttentionMaps([p for t in targets for p in t.positions], [s.steps // 4],
                                         pipe.cfg.default_blocks())
                hooks.append(observer)
        image, seconds = generate(pipe, prompt, seed, s, hooks)
        on_image()
        found, swap = judge_image(judge, image, objects)
        plain_found = found if v.method == "plain" else plain_found
        if observer:
            ends = np.cumsum([len(t.positions) for t in targets])
            groups = [(t.word, list(range(e - len(t.positions), e))) for t, e in zip(targets, ends)]
            maps[v.name] = ([t.word for t in targets],
                            {st: m[0] for st, m in word_maps(observer.result(), groups).items()})
        mad, sim = drift(image, images.get("plain", image))
        images[v.name] = image
        judged = found is not None
        rows.append(dict(seed=seed, method=v.name, prompt=prompt, objects=json.dumps(objects),
                         targets=" ".join(t.word for t in targets),
                         found=" ".join(str(int(f)) for f in found) if judged else "",
                         all_found=int(all(found)) if judged else "",
                         recall=round(sum(found) / len(found), 4) if judged else "",
                         swap="" if swap is None else int(swap),
                         mad=round(mad, 6), ssim=round(sim, 6), seconds=round(seconds, 4)))
    return Unit(rows, images, maps)


# ----------------------------------------------------------------------------------------------------------
# the table and the examples

def summarise(rows, names):
    """{variant: metrics} from CSV rows (strings); a fraction is None where nothing could be judged."""
    num = lambda r, k: float(r[k]) if r[k] != "" else None
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    plain = {(r["prompt"], r["seed"]): num(r, "all_found") for r in rows if r["method"] == "plain"}
    out = {}
    for name in names:
        rs = [r for r in rows if r["method"] == name]
        judged = [r for r in rs if r["all_found"] != ""]
        pair = [(plain.get((r["prompt"], r["seed"])), num(r, "all_found")) for r in judged]
        out[name] = dict(images=len(rs), judged=len(judged), detection=mean([num(r, "all_found") for r in judged]),
                         recall=mean([num(r, "recall") for r in judged]),
                         binding=mean([1 - num(r, "swap") for r in rs if r["swap"] != ""]),
                         fixed=sum(p == 0 and m == 1 for p, m in pair), broke=sum(p == 1 and m == 0 for p, m in pair),
                         mad=mean([num(r, "mad") for r in rs]), ssim=mean([num(r, "ssim") for r in rs]),
                         seconds=mean([num(r, "seconds") for r in rs]))
    return out


def format_table(summary):
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    base = summary["plain"]["seconds"]
    lines = ["| method | images | detection | object recall | binding | fixed / broke | MAD | SSIM | s / image | overhead |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, m in summary.items():
        fb = "" if name == "plain" or not m["judged"] else f"+{m['fixed']} / -{m['broke']}"
        lines.append(f"| {name} | {m['images']} | {pct(m['detection'])} | {pct(m['recall'])} | {pct(m['binding'])} | "
                     f"{fb} | {m['mad']:.4f} | {m['ssim']:.4f} | {m['seconds']:.3f} | {m['seconds'] / base - 1:+.0%} |")
    return "\n".join(lines)


def examples_sheet(examples, cell=128):
    """One block per example: the prompt and each method's count of objects found, the plain image, then per
    method its image and its targets' attention maps (minisd.maps.grid)."""
    blocks = []
    for ex in examples:
        step = max((st for _, m in ex.maps.values() for st in m), default=0)
        panels = [grid(ex.images["plain"], [("plain", ex.images["plain"], {step: None})], [], cell)]
        panels += [grid(ex.images[n], [(n, ex.images[n], m)], words, cell) for n, (words, m) in ex.maps.items()]
        count = lambda r: f"{r['found'].count('1')}/{len(r['found'].split())}" if r["found"] else "?"
        text = f"{ex.rows[0]['prompt']}  (seed {ex.rows[0]['seed']})\nfound: " + \
            "  ".join(f"{r['method']} {count(r)}" for r in ex.rows)
        block = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels) + 30), "white")
        ImageDraw.Draw(block).text((4, 2), text, fill="black")
        for k, p in enumerate(panels):
            block.paste(p, (sum(q.width for q in panels[:k]), 30))
        blocks.append(block)
    sheet = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white")
    for k, b in enumerate(blocks):
        sheet.paste(b, (0, sum(q.height for q in blocks[:k])))
    return sheet


# ----------------------------------------------------------------------------------------------------------
# command line

def read_rows(path, settings):
    """The rows already in results.csv; refuses a file made with other settings (they would mix in the table)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if reader.fieldnames != COLUMNS:
        raise ValueError(f"{path} has other columns than this evaluator writes; use another --out")
    for r in rows:
        if r["settings"] != settings:
            raise ValueError(f"{path} holds results of other settings ({r['settings']}, now {settings}); "
                             "use another --out")
    return rows


def run(args, log=print):
    if args.threads:
        torch.set_num_threads(args.threads)
    items = load_prompts(args.prompts, args.n_prompts, args.prompt_seed)[:args.limit]
    variants = parse_variants(args.methods, args.targets)
    judge = load_judge(args.judge)
    for item in items:
        if item["objects"] is None and hasattr(judge, "objects_for"):
            item["objects"] = judge.objects_for(item["prompt"])
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    from minisd.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(ckpt, device=args.device)
    s = Settings(args.steps or pipe.cfg.default_steps, pipe.cfg.default_guidance if args.guidance is None
                 else args.guidance, args.size or pipe.cfg.image_size, args.layers, args.edit_steps)
    ckpt_hash = file_hash(ckpt)
    settings = (f"steps={s.steps} guidance={s.guidance} size={s.size} layers={s.layers} edit_steps={s.edit_steps} "
                f"judge={args.judge} checkpoint={ckpt_hash}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    old = read_rows(path, settings)
    have = {(r["prompt"], r["seed"], r["method"]) for r in old}
    units = [(i, item, seed) for i, item in enumerate(items) for seed in range(args.seed, args.seed + args.seeds)]
    wanted = {(item["prompt"], str(seed), v.name) for _, item, seed in units for v in variants}
    todo = [u for u in units if any((u[1]["prompt"], str(u[2]), v.name) not in have for v in variants)]
    log(f"{len(units)} prompt x seed ({len(units) - len(todo)} already in {path}), methods "
        f"{', '.join(v.name for v in variants)}, {s.steps} steps, guidance {s.guidance}, {s.size} px")

    examples = []
    if todo:
        generate(pipe, items[0]["prompt"], 0, Settings(1, s.guidance, s.size))  # warm-up, kept out of the timings
        bar = tqdm(total=len(todo) * len(variants), desc="images", unit="img")
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            if not old:
                writer.writeheader()
            for i, item, seed in todo:
                unit = evaluate_one(pipe, item, seed, variants, judge, s, want_maps=len(examples) < args.examples,
                                    on_image=lambda: bar.update(1))
                writer.writerows(dict(r, prompt_id=i, settings=settings) for r in unit.rows
                                 if (item["prompt"], str(seed), r["method"]) not in have)
                f.flush()   # an interrupted run keeps every finished prompt x seed
                if unit.maps:
                    examples.append(unit)
        bar.close()

    rows = [r for r in read_rows(path, settings) if (r["prompt"], r["seed"], r["method"]) in wanted]
    summary = summarise(rows, [v.name for v in variants])
    table = format_table(summary)
    header = [f"# Semantic fidelity: {len(items)} prompts x {args.seeds} seeds", "",
              "    python -m tools.evaluate " + shlex.join(args.argv), "",
              f"Checkpoint `{ckpt}` (sha256 {ckpt_hash}), {s.steps} steps, guidance {s.guidance}, {s.size} px, "
              f"judge `{args.judge}` ({summary['plain']['judged']} of {len(units)} plain images judged), "
              f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {torch.get_num_threads()} torch threads on {args.device}.",
              "", DEFINITIONS, ""]
    (out / "table.md").write_text("\n".join(header + [table, ""]))
    if examples:
        examples_sheet(examples).save(out / "examples.png")
    log(table)
    log(f"wrote {path}, {out / 'table.md'}" + (f", {out / 'examples.png'} ({len(examples)} examples)" if examples
                                               else " (no new image where plain missed an object: no examples.png)"))
    return summary


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--prompts", default=None, help="JSONL of {prompt, objects} or a text file of prompts "
                                                    "(default: the held-out two-object shapes prompts)")
    ap.add_argument("--n-prompts", type=int, default=120, help="how many held-out prompts (without --prompts)")
    ap.add_argument("--prompt-seed", type=int, default=0, help="seed of the held-out prompts' order and templates")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--seeds", type=int, default=4, help="images per prompt and method")
    ap.add_argument("--seed", type=int, default=0, help="first image seed")
    ap.add_argument("--methods", default="plain,regulate", help="comma-separated: plain and regulation.editors methods")
    ap.add_argument("--targets", default="nouns", choices=[*TARGET_MODES, "both"], help="which words are regulated")
    ap.add_argument("--layers", default=None, help="regulated layers (see regulation/layers.py); default: the model's")
    ap.add_argument("--edit-steps", type=int, default=None, help="regulated steps (default: half of --steps)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    ap.add_argument("--judge", default="tools.judge:ShapesJudge", help="module:attr of a Judge (tools.judge)")
    ap.add_argument("--examples", type=int, default=8, help="rows of examples.png")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default="eval")
    return ap


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    for name in ("seeds", "n_prompts", "limit", "steps", "size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    try:
        return run(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
