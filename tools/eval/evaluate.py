"""The semantic-fidelity benchmark: how often does each method draw every object that a prompt names?

Object neglect (Chefer et al., "Attend-and-Excite", SIGGRAPH 2023): a prompt names two things, the image shows one.
Attention Regulation (Zhang et al., ECCV 2024, arXiv 2403.06381) edits the cross-attention to fight it. For each
prompt and seed this draws the plain image once, then each method's image from the same seed, asks a judge which
named objects each image shows (and scorers such as CLIP how well it matches), and measures how far each method's
image drifts from the plain one and what it costs.

    python -m tools.eval                                   # 120 held-out prompts x 4 seeds, plain vs regulate
    python -m tools.eval --limit 8 --seeds 1 --steps 20 --out /tmp/eval   # a quick look
    python -m tools.eval --prompts ae --list-prompts       # the Attend-and-Excite set and its target words
    torchrun --nproc-per-node 8 -m tools.eval --device cuda --prompts ae --checkpoint sd15.safetensors \
        --judge tools.eval.real_judges:OwlDetector,tools.eval.real_judges:ClipScore \
        --methods plain,attend-excite,regulate

A (prompt, seed) pair is a unit of work. Under torchrun the units are dealt out round-robin over the ranks
(torch.distributed: gloo on CPU, nccl with --device cuda, one GPU per rank from LOCAL_RANK); without it the one
process is rank 0 of 1. Each rank appends its rows to OUT/parts/part-<attempt>-rank<r>.csv, flushed after every
unit, so a killed rank loses at most the unit it was drawing. When every rank is done, rank 0 merges the parts into
OUT/results.csv (one row per prompt x seed x method, in prompt, seed, method order), OUT/table.md and
OUT/examples.png, and prints the table. The same command run again draws only the units no part file holds.
A unit's images depend only on its prompt and seed (every random draw comes from generators seeded with it), so
its row is the same whichever rank drew it, given the same hardware and thread count; only `seconds` varies.
"""
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
import argparse
import contextlib
import csv
import importlib
import json
import os
import re
import shlex
import signal
import sys
import time
import zlib
from datetime import timedelta

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from minisd.blocks import block_of
from minisd.maps import AttentionMaps, grid, word_maps
from minisd.checkpoint import DEFAULT_CHECKPOINT, file_hash
from regulation.editors import METHODS, choose_targets, set_up
from regulation.joint_regulation import choose_joint_targets, is_joint
from regulation.registry import Run
from regulation.syngen import NoPairsError
from regulation.targets import auto_targets, is_adjective
from tools.testbed import shapes

TARGET_MODES = ("nouns", "attr+nouns")
COLUMNS = ["prompt_id", "seed", "method", "prompt", "objects", "targets", "found", "all_found", "recall", "swap",
           "types", "mad", "ssim", "scores", "seconds", "settings"]
# what a judge's failures(image, objects) reports (tools.testbed.judge.failure_types), in the table's order
MAIN_TYPES = ("presence", "strict", "exact")   # each with its interval against plain
TYPES = {"omission": "omission", "wrong_shape": "wrong shape", "colour_swap": "colour swap",
         "wrong_colour": "wrong colour", "extra": "extra objects"}
PROMPT_SETS = {"ae": Path(__file__).parent / "data" / "ae_prompts.jsonl"}   # --prompts NAME
# The Attention Regulation paper's figures on the Attend-and-Excite prompts (its project page), by method:
# (detection rate, CLIP score, time overhead). Printed beside ours when --prompts ae.
PAPER_AE = {"plain": ("46.7%", "0.324", "-"), "attend-excite": ("60.8%", "0.331", "+414.6%"),
            "regulate": ("66.2%", "0.337", "+48.8%")}
TYPE_DEFINITIONS = """\
- presence: share of images that show every named shape, in any colour (as many of each as named): the paper's
  detection. strict: every named object in its named colour (the judge's verdict). exact: strict and no extra
  object, every named object in its colour and nothing else.
- vs plain, 95% CI: the method's share minus plain's, in points, with a paired bootstrap interval (per-prompt
  differences averaged over seeds; prompts resampled with replacement, 10,000 times). fixed / broke: images where
  plain failed and the method passed / plain passed and the method failed.
- failure types (shares of all images; not exclusive): omission, fewer objects than named; wrong shape, a named
  shape missing although as many objects as named were drawn; colour swap, every shape there and a named shape in
  another named object's colour; wrong colour, every shape there and some colour wrong without such a swap; extra
  objects, more objects than named (a two-coloured shape counts twice).
- object recall: share of named objects found in their colour.
- MAD, SSIM: the method's image against plain's of the same prompt and seed: mean absolute difference of pixels
  in [0, 1], and SSIM (Wang et al. 2004) of the grey (BT.601 luma) images over 7x7 uniform windows.
- s / image: wall-clock seconds from prompt to decoded image (one image per call); overhead: against plain."""
DEFINITIONS = """\
- detection: share of images in which the judge finds every named object (shapes: the right colour on the right shape).
- object recall: share of named objects found.
- binding: share of images with no attribute swap, over prompts that name two or more (attribute, noun) objects.
  A swap: a named noun is seen with another named object's attribute ("a red circle and a blue square": a blue
  circle or a red square). The judge is asked about these swapped objects as about the named ones.
- fixed / broke: images where plain missed an object and the method found all / plain found all and the method did not.
- detection vs plain, 95% CI: the method's detection minus plain's, in points, with a paired bootstrap interval
  (per-prompt differences averaged over seeds; prompts resampled with replacement, 10,000 times).
- MAD, SSIM: the method's image against plain's of the same prompt and seed: mean absolute difference of pixels
  in [0, 1], and SSIM (Wang et al. 2004) of the grey (BT.601 luma) images over 7x7 uniform windows.
- scores: the scorers' means (tools.eval.real_judges.ClipScore: CLIP cosine similarity of the image with the whole
  prompt, and the minimum over the prompt's objects of its similarity with "a photo of a <object>").
- s / image: wall-clock seconds from prompt to decoded image (one image per call); overhead: against plain."""


@dataclass
class Variant:
    name: str      # as in the table: "plain", "regulate[nouns]"
    method: str    # "plain" or a method of regulation.editors
    targets: str   # one of TARGET_MODES ("" for plain)
    options: dict = field(default_factory=dict)   # more set_up arguments: strength, edit_steps, phrase_swap ...


@dataclass
class Settings:
    steps: int
    guidance: float
    size: int
    layers: str = None
    edit_steps: int = None


@dataclass
class Unit:
    """What one prompt x seed gives: a CSV row per variant, the images, and {variant: (words, maps, layers)} on
    request (layers: the names of the layers the maps were averaged over)."""
    rows: list
    images: dict
    maps: dict = field(default_factory=dict)
    prompt_id: int = 0


# ----------------------------------------------------------------------------------------------------------
# prompts, methods, targets, judge

def load_prompts(path=None, n=120, seed=0):
    """[dict(prompt=..., objects=[(attribute, noun) or "phrase", ...] or None[, targets=[word, ...]])]: the
    held-out shapes prompts (path None), a named set of PROMPT_SETS ("ae": Attend-and-Excite's 276), a JSONL file
    of such dicts (objects and targets optional; targets, when given, are the words to regulate), or a text file
    of one prompt per line (objects unknown). Lines starting with # are comments."""
    if path is None:
        return [dict(prompt=d["prompt"], objects=[tuple(o) for o in d["objects"]])
                for d in shapes.benchmark_prompts(n, seed)]
    path = PROMPT_SETS.get(str(path), path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file (or one of the sets {', '.join(PROMPT_SETS)})")
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
        targets = d.get("targets") if isinstance(d, dict) else None
        if not (isinstance(d, dict) and isinstance(d.get("prompt"), str) and isinstance(objs or [], list)
                and all(isinstance(o, (str, list)) for o in objs or [])
                and isinstance(targets or [], list) and all(isinstance(t, str) for t in targets or [])):
            raise ValueError(f'{path}:{i}: expected one JSON object per line, like {{"prompt": "a red circle and a '
                             f'blue square", "objects": [["red", "circle"], ["blue", "square"]], '
                             f'"targets": ["circle", "square"]}} (objects and targets optional)')
        objs = [tuple(o) if isinstance(o, list) else o for o in objs] if objs else None
        item = dict(prompt=d["prompt"], objects=objs)
        if targets:
            item["targets"] = list(targets)
        items.append(item)
    return items


def targeted(method):
    """Whether --targets chooses the method's target words (Attention Regulation, Attend-and-Excite): it takes
    words, which regulation.editors.choose_targets resolves."""
    return METHODS[method].takes_words


def parse_variants(methods, targets):
    """"plain,regulate" and "both" -> plain, regulate[nouns], regulate[attr+nouns]. Plain always runs: the drift
    is measured against it. SynGen parses its own pairs, DenseDiffusion is given the renderer's layout ("dense[layout
    given]"), Composable Diffusion its concepts: --targets does not apply to them."""
    modes = TARGET_MODES if targets == "both" else (targets,)
    if not set(modes) <= set(TARGET_MODES):
        raise ValueError(f"--targets must be one of {', '.join(TARGET_MODES)} or both, got {targets!r}")
    names = [m.strip() for m in methods.split(",") if m.strip() not in ("", "plain")]
    for m in names:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from plain, {', '.join(METHODS)}")
    out = [Variant("plain", "plain", "")]
    for m in dict.fromkeys(names):
        if targeted(m):
            out += [Variant(f"{m}[{t}]", m, t) for t in modes]
        else:
            out.append(Variant("dense[layout given]" if m == "dense" else m, m, ""))
    return out


def concepts(item):
    """Composable Diffusion's concepts: one per named object where the objects are known ("a red circle | a blue
    square", whatever words join them in the prompt), else None (the prompt split at "and" and commas)."""
    objs = item["objects"]
    if not objs:
        return None
    phrases = [" ".join(o) if isinstance(o, (tuple, list)) else o for o in objs]
    return " | ".join(("an " if p[0] in "aeiou" else "a ") + p for p in phrases)


def renderer_layout(item, seed, size):
    """DenseDiffusion's layout for a shapes prompt: the renderer places the named objects at random, as it would
    draw them, from a generator seeded by the prompt and the image seed; each object's phrase gets its mask."""
    keys = [tuple(o) for o in item["objects"] or []]
    if not keys or not all(len(k) == 2 and k[0] in shapes.COLOURS and k[1] in shapes.SHAPES for k in keys):
        raise ValueError(f"dense needs a layout: only shapes-world prompts have one (the renderer's), not "
                         f"{item['prompt']!r}")
    scene = shapes.sample_scene(np.random.default_rng([seed, zlib.crc32(item["prompt"].encode())]), keys=keys)
    masks = torch.as_tensor(shapes.object_masks(scene, size, size)).float()
    return [(f"{c} {n}", m) for (c, n), m in zip(keys, masks)]


def target_words(item, mode):
    """Words to regulate. Known objects, each an (attribute, noun) pair or a phrase like "red circle": each one's
    noun, its last word ("nouns"), or all its words ("attr+nouns"). Unknown objects: the nouns that
    regulation.targets.auto_targets picks, and for attr+nouns also the prompt's adjectives, in prompt order.
    A repeated word becomes "red", "red#2": how regulation.targets.resolve_targets picks an occurrence.
    Targets given with the prompt (a JSONL "targets" list) are used as they are, in both modes."""
    if item.get("targets"):
        return list(item["targets"])
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


def judge_classes(spec):
    """"module:attr[,module:attr...]" -> [(spec, the attribute)]: a class, or a ready judge object."""
    out = []
    for one in [x.strip() for x in spec.split(",") if x.strip()]:
        mod, _, attr = one.rpartition(":")
        if not mod or not attr:
            raise ValueError(f"--judge must look like module:attr[,module:attr], got {spec!r}")
        module = importlib.import_module(mod)
        if not hasattr(module, attr):
            raise ValueError(f"--judge {one}: {mod} has no {attr!r}")
        out.append((one, getattr(module, attr)))
    if not out:
        raise ValueError("--judge names no judge")
    return out


def add_judge_arguments(ap, argv):
    """Let the classes named by --judge add their own flags (a judge class may have add_arguments(parser) and
    from_args(args)), so `--detector-threshold` exists when the detector is asked for."""
    pre = argparse.ArgumentParser(add_help=False)   # --help waits until the judges' flags are in
    pre.add_argument("--judge", default=ap.get_default("judge"))
    known, _ = pre.parse_known_args(argv)
    seen = set()
    for _, obj in judge_classes(known.judge):
        if isinstance(obj, type) and hasattr(obj, "add_arguments") and obj not in seen:
            seen.add(obj)
            obj.add_arguments(ap)


@dataclass
class Judges:
    """What --judge names: at most one presence judge, judge(image, objects) -> [bool] per object (tools.testbed.judge),
    and any number of scorers, scorer.scores(image, prompt, objects) -> {name: float} (tools.eval.real_judges).
    An object may be both. `settings`: what the results depend on (models, thresholds, templates)."""
    presence: object
    scorers: list
    settings: str

    def objects_for(self, prompt):
        for j in [self.presence, *self.scorers]:
            if j is not None and hasattr(j, "objects_for"):
                return j.objects_for(prompt)
        return None


def load_judges(spec, args=None):
    """Build what --judge names: a class is made with from_args(args) when it has one, else with no arguments."""
    presence, scorers, settings = None, [], []
    for one, obj in judge_classes(spec):
        if isinstance(obj, type):
            obj = obj.from_args(args) if hasattr(obj, "from_args") and args is not None else obj()
        is_scorer = callable(getattr(obj, "scores", None))
        if callable(obj):
            if presence is not None:
                raise ValueError(f"--judge {spec}: two judges say which objects are present; name one")
            presence = obj
        if is_scorer:
            scorers.append(obj)
        if not callable(obj) and not is_scorer:
            raise ValueError(f"--judge {one}: {obj!r} is neither a judge(image, objects) -> [bool] nor has "
                             "scores(image, prompt, objects)")
        settings.append(f"{one}({obj.settings})" if getattr(obj, "settings", None) else one)
    return Judges(presence, scorers, " ".join(settings))


def load_judge(spec):
    """One presence judge from "module:attr" (a class is instantiated with no arguments)."""
    judge = load_judges(spec).presence
    if judge is None:
        raise ValueError(f"--judge {spec}: not callable as judge(image, objects) -> [bool]")
    return judge


def judge_image(judge, image, objects):
    """(found, one bool per named object; swap, whether a named noun is seen with another named object's
    attribute, None below two pairs; types, the judge's failures(image, objects) where it has one, else None).
    The judge gets the named objects and the swapped ones in one call."""
    if not objects:
        return None, None, None
    pairs = len(objects) >= 2 and all(isinstance(o, tuple) and len(o) == 2 for o in objects)
    swaps = list(dict.fromkeys((a, n) for _, n in objects for a, _ in objects if (a, n) not in objects)) \
        if pairs else []
    verdict = list(judge(np.asarray(image.convert("RGB")), list(objects) + swaps))
    if len(verdict) != len(objects) + len(swaps):
        raise ValueError(f"the judge gave {len(verdict)} answers for {len(objects) + len(swaps)} objects")
    types = None
    if callable(getattr(judge, "failures", None)):
        types = {k: bool(v) for k, v in judge.failures(np.asarray(image.convert("RGB")), list(objects)).items()}
    return [bool(v) for v in verdict[:len(objects)]], (any(verdict[len(objects):]) if pairs else None), types


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

def generate(pipe, prompt, seed, s, hooks=(), run=None):
    t = time.perf_counter()
    with run.context if run else contextlib.nullcontext():
        image = pipe(prompt, steps=s.steps, guidance=s.guidance, seed=seed, height=s.size, width=s.size,
                     hooks=hooks, **(run.options if run else {})).images[0]
    return image, time.perf_counter() - t


def evaluate_one(pipe, item, seed, variants, judge, s, want_maps=False, on_image=lambda: None, scorers=()):
    """Plain once, then each variant from the same seed; judge each image (judge may be None), score it (each
    scorer's scores(image, prompt, objects)) and measure its drift from plain.
    With want_maps, when plain missed an object (or the objects are unknown), the regulated runs also record
    their targets' cross-attention at step steps // 4 in the layers their editor edits (after the edit)."""
    prompt, objects = item["prompt"], item["objects"]
    rows, images, maps, plain_found = [], {}, {}, None
    quiet = lambda *a: None
    for v in variants:
        hooks, observer, targets, run = [], None, [], None
        if v.method != "plain":
            if targeted(v.method):
                words = target_words(item, v.targets)
                targets = (choose_joint_targets(pipe, prompt, words, log=None) if is_joint(pipe.cfg)
                           else choose_targets(pipe.tokenizer, prompt, words, log=quiet))
            elif v.method == "composable":
                targets = concepts(item)
            try:
                takes = METHODS[v.method].takes   # the run's settings for the methods that take them
                options = dict(layers=s.layers if "layers" in takes else None,
                               edit_steps=s.edit_steps if "edit_steps" in takes else None)
                run = set_up(v.method, pipe, prompt, s.steps, targets=targets or None, seed=seed,
                             layout=renderer_layout(item, seed, s.size) if v.method == "dense" else None,
                             height=s.size, width=s.size, guidance=s.guidance, log=quiet,
                             **{**options, **v.options})
            except NoPairsError:
                # a prompt with no modifier: the authors' SynGen has a zero loss there and leaves the image as it is
                run = Run(v.method)
            targets = run.shown or []
            hooks += run.hooks
            if want_maps and run.shown and not (plain_found and all(plain_found)):
                observer = AttentionMaps([p for t in targets for p in t.positions], [s.steps // 4], run.select)
                hooks.append(observer)
        image, seconds = generate(pipe, prompt, seed, s, hooks, run)
        on_image()
        found, swap, types = judge_image(judge, image, objects) if judge is not None else (None, None, None)
        scores = {}
        for scorer in scorers:
            scores.update({k: round(float(x), 6) for k, x in scorer.scores(np.asarray(image.convert("RGB")), prompt,
                                                                          objects).items()})
        plain_found = found if v.method == "plain" else plain_found
        if observer and observer.maps:
            ends = np.cumsum([len(t.positions) for t in targets])
            groups = [(t.word, list(range(e - len(t.positions), e))) for t, e in zip(targets, ends)]
            maps[v.name] = ([t.word for t in targets],
                            {st: m[0] for st, m in word_maps(observer.result(), groups).items()},
                            sorted(observer.layers_seen))
        mad, sim = drift(image, images.get("plain", image))
        images[v.name] = image
        judged = found is not None
        rows.append(dict(seed=seed, method=v.name, prompt=prompt, objects=json.dumps(objects),
                         targets=" ".join(t.word for t in targets),
                         found=" ".join(str(int(f)) for f in found) if judged else "",
                         all_found=int(all(found)) if judged else "",
                         recall=round(sum(found) / len(found), 4) if judged else "",
                         swap="" if swap is None else int(swap),
                         types=json.dumps({k: int(v) for k, v in types.items()}) if types else "",
                         mad=round(mad, 6), ssim=round(sim, 6), scores=json.dumps(scores) if scores else "",
                         seconds=round(seconds, 4)))
    return Unit(rows, images, maps)


# ----------------------------------------------------------------------------------------------------------
# the table and the examples

def paired_ci(pairs, resamples=10_000, seed=0):
    """Detection (or any 0/1 measure's) difference (method - plain, in points) and its 95% interval: the images'
    differences are
    averaged per prompt (its seeds), and the prompts are resampled with replacement (paired bootstrap), since
    prompts, not seeds, are what varies most. pairs: [(prompt, plain 0/1, method 0/1)]. None without pairs."""
    per = {}
    for prompt, p, m in pairs:
        per.setdefault(prompt, []).append(m - p)
    if not per:
        return None
    d = np.array([np.mean(v) for v in per.values()])
    boot = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return 100 * float(d.mean()), 100 * float(lo), 100 * float(hi)


def _compare(rows, names, value):
    """{variant: (share, (diff, lo, hi) or None, fixed, broke)} of a 0/1 measure value(row) (None: not judged),
    each variant against plain on the same prompt and seed."""
    plain = {(r["prompt"], r["seed"]): value(r) for r in rows if r["method"] == "plain"}
    out = {}
    for name in names:
        judged = [(r, value(r)) for r in rows if r["method"] == name and value(r) is not None]
        pair = [(r["prompt"], plain.get((r["prompt"], r["seed"])), m) for r, m in judged]
        pair = [(pr, p, m) for pr, p, m in pair if p is not None]
        out[name] = (sum(m for _, m in judged) / len(judged) if judged else None,
                     paired_ci(pair) if name != "plain" else None,
                     sum(p == 0 and m == 1 for _, p, m in pair), sum(p == 1 and m == 0 for _, p, m in pair))
    return out


def failure(row, kind):
    """A row's 0/1 failure type (None where the judge gave none). "exact": every named object in its colour and
    nothing else (strict, and no extra object), the column the paper's detection rate cannot see."""
    if not row.get("types"):
        return None
    t = json.loads(row["types"])
    if kind == "exact":
        from tools.testbed.judge import exact
        return int(exact(t)) if "strict" in t and "extra" in t else None
    return t.get(kind)


def summarise(rows, names):
    """{variant: metrics} from CSV rows (strings); a fraction is None where nothing could be judged.
    metrics["scores"]: {score name: mean over the images that have it}; metrics["types"]: {failure type: (share,
    CI against plain or None, fixed, broke)} where the judge reports failure types (presence and strict first)."""
    num = lambda r, k: float(r[k]) if r[k] != "" else None
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    detection = _compare(rows, names, lambda r: num(r, "all_found"))
    kinds = list(dict.fromkeys(k for r in rows if r.get("types") for k in json.loads(r["types"])))
    if {"strict", "extra"} <= set(kinds):
        kinds.insert(kinds.index("strict") + 1, "exact")
    types = {k: _compare(rows, names, lambda r, k=k: failure(r, k)) for k in kinds}
    out = {}
    for name in names:
        rs = [r for r in rows if r["method"] == name]
        judged = [r for r in rs if r["all_found"] != ""]
        share, ci, fixed, broke = detection[name]
        scores = [json.loads(r["scores"]) for r in rs if r["scores"]]
        keys = list(dict.fromkeys(k for sc in scores for k in sc))
        out[name] = dict(images=len(rs), judged=len(judged), detection=share,
                         recall=mean([num(r, "recall") for r in judged]),
                         binding=mean([1 - num(r, "swap") for r in rs if r["swap"] != ""]),
                         fixed=fixed, broke=broke, ci=ci,
                         mad=mean([num(r, "mad") for r in rs]), ssim=mean([num(r, "ssim") for r in rs]),
                         seconds=mean([num(r, "seconds") for r in rs]),
                         scores={k: mean([sc[k] for sc in scores if k in sc]) for k in keys},
                         types={k: types[k][name] for k in kinds})
    return out


def format_types_table(summary):
    """The table of a judge with failure types: presence (the paper's measure) first, then strict, each with its
    interval and fixed / broke against plain, then the failure types, recall, drift and time."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    ci = lambda c: "" if c is None else "{:+.1f} [{:+.1f}, {:+.1f}]".format(*c)
    base = summary["plain"]["seconds"]
    kinds = [k for k in TYPES if any(k in m["types"] for m in summary.values())]
    lines = ["| method | images | " + "".join(f"{k} | vs plain, 95% CI | fixed / broke | " for k in MAIN_TYPES) +
             "".join(f"{TYPES[k]} | " for k in kinds) + "object recall | MAD | SSIM | s / image | overhead |",
             "|---|--:|" + "--:|--:|--:|" * len(MAIN_TYPES) + "--:|" * len(kinds) + "--:|--:|--:|--:|--:|"]
    for name, m in summary.items():
        cells = []
        for k in MAIN_TYPES:
            share, c, fixed, broke = m["types"].get(k, (None, None, 0, 0))
            cells += [pct(share), ci(c), "" if name == "plain" else f"+{fixed} / -{broke}"]
        cells += [pct(m["types"][k][0]) if k in m["types"] else "n/a" for k in kinds]
        lines.append(f"| {name} | {m['images']} | " + " | ".join(cells) + f" | {pct(m['recall'])} | {m['mad']:.4f} | "
                     f"{m['ssim']:.4f} | {m['seconds']:.3f} | {m['seconds'] / base - 1:+.0%} |")
    return "\n".join(lines)


def format_table(summary):
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    if any("presence" in m["types"] for m in summary.values()):
        return format_types_table(summary)
    base = summary["plain"]["seconds"]
    keys = list(dict.fromkeys(k for m in summary.values() for k in m["scores"]))
    lines = ["| method | images | detection | object recall | binding | fixed / broke | detection vs plain, 95% CI | " +
             "".join(f"{k} | " for k in keys) + "MAD | SSIM | s / image | overhead |",
             "|---|--:|--:|--:|--:|--:|--:|" + "--:|" * len(keys) + "--:|--:|--:|--:|"]
    for name, m in summary.items():
        fb = "" if name == "plain" or not m["judged"] else f"+{m['fixed']} / -{m['broke']}"
        ci = "" if m["ci"] is None else "{:+.1f} [{:+.1f}, {:+.1f}]".format(*m["ci"])
        sc = "".join("n/a | " if m["scores"].get(k) is None else f"{m['scores'][k]:.4f} | " for k in keys)
        lines.append(f"| {name} | {m['images']} | {pct(m['detection'])} | {pct(m['recall'])} | {pct(m['binding'])} | "
                     f"{fb} | {ci} | {sc}{m['mad']:.4f} | {m['ssim']:.4f} | {m['seconds']:.3f} | "
                     f"{m['seconds'] / base - 1:+.0%} |")
    return "\n".join(lines)


def paper_table(summary, variants):
    """Our detection, CLIP and overhead beside the Attention Regulation paper's on the Attend-and-Excite prompts."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    base = summary["plain"]["seconds"]
    lines = ["| method | ours: detection | paper: detection | ours: CLIP (prompt) | paper: CLIP | ours: overhead | "
             "paper: overhead |", "|---|--:|--:|--:|--:|--:|--:|"]
    for v in variants:
        m, (det, clip, over) = summary[v.name], PAPER_AE[v.method]
        ours_clip = m["scores"].get("clip_prompt")
        ours_clip = "n/a" if ours_clip is None else f"{ours_clip:.3f}"
        overhead = "-" if v.method == "plain" else f"{m['seconds'] / base - 1:+.1%}"
        lines.append(f"| {v.name} | {pct(m['detection'])} | {det} | {ours_clip} | {clip} | {overhead} | {over} |")
    return "\n".join(lines)


def examples_sheet(examples, cell=128):
    """One block per example: the prompt and each method's count of objects found, the plain image, then per
    method its image and its targets' attention maps (minisd.maps.grid)."""
    blocks = []
    for ex in examples:
        step = max((st for _, m, _ in ex.maps.values() for st in m), default=0)
        panels = [grid([("plain", ex.images["plain"], {step: None})], [], cell)]
        panels += [grid([(n, ex.images[n], m)], words, cell) for n, (words, m, _) in ex.maps.items()]
        count = lambda r: f"{r['found'].count('1')}/{len(r['found'].split())}" if r["found"] else "?"
        layers = sorted({block_of(name) for _, _, names in ex.maps.values() for name in names})
        text = f"{ex.rows[0]['prompt']}  (seed {ex.rows[0]['seed']})\nfound: " + \
            "  ".join(f"{r['method']} {count(r)}" for r in ex.rows) + f"   maps: {', '.join(layers)}"
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
    """The complete rows of a results or part file; refuses a file made with other settings (they would mix in
    the table). A part file's last line may be torn (its rank was killed while writing): a line without its
    newline, or with too few fields, is no row."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        text = f.read()
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    reader = csv.DictReader(text.splitlines(keepends=True))
    rows = [r for r in reader if None not in r.values() and None not in r]
    if reader.fieldnames is not None and reader.fieldnames != COLUMNS:
        raise ValueError(f"{path} has other columns than this evaluator writes; use another --out")
    for r in rows:
        if r["settings"] != settings:
            raise ValueError(f"{path} holds results of other settings ({r['settings']}, now {settings}); "
                             "use another --out")
    return rows


PART = re.compile(r"part-(\d+)-rank(\d+)\.csv")


def part_files(out):
    """OUT/parts/part-<attempt>-rank<r>.csv, in (attempt, rank) order."""
    found = [(PART.fullmatch(p.name), p) for p in (out / "parts").glob("part-*.csv")]
    return [p for _, p in sorted((tuple(map(int, m.groups())), p) for m, p in found if m)]


def done_rows(out, settings):
    """{(prompt, seed, method): row} of every row already written: OUT/results.csv and all part files. A key found
    twice (two commands run at once on the same --out) keeps its first row."""
    rows = {}
    for path in [out / "results.csv", *part_files(out)]:
        for r in read_rows(path, settings):
            rows.setdefault((r["prompt"], r["seed"], r["method"]), r)
    return rows


def write_csv(path, rows):
    """Write a whole CSV next to its place, then move it there: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def distributed(device):
    """(rank, world size, device, process group for coordination). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK
    in the environment) this joins the process group: nccl with a CUDA device, each rank on GPU LOCAL_RANK, gloo
    on CPU; the small objects the ranks exchange (the work list, the examples) go through a gloo group either way.
    Without torchrun: (0, 1, device, None). The timeout is long because ranks wait for the slowest at the end."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device, None
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", 0))
    timeout = timedelta(hours=24)
    if torch.device(device).type == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout)
        group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        group = dist.group.WORLD
    return dist.get_rank(), dist.get_world_size(), device, group


def kill_switch(rank):
    """For the tests of resuming: MINISD_EVAL_KILL_AFTER="<rank>:<units>" makes that rank SIGKILL itself after
    writing that many units, as a machine or a scheduler would."""
    spec = os.environ.get("MINISD_EVAL_KILL_AFTER", "")
    r, _, k = spec.partition(":")
    return int(k) if spec and int(r) == rank else None


def run(args, log=print, items=None, variants=None):
    """Evaluate args' prompts and methods (or the `items` and `variants` given: tools.eval.paper_table's stages)."""
    rank, world, args.device, group = distributed(args.device)
    try:
        return _run(args, rank, world, group, log if rank == 0 else (lambda *a: None), items, variants)
    finally:
        if group is not None:
            import torch.distributed as dist
            dist.destroy_process_group()


def repo_path(path):
    """A path as the tables name it: relative to the repository where it lies inside it."""
    path = Path(path).resolve()
    root = Path(__file__).resolve().parents[2]
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _run(args, rank, world, group, log, items=None, variants=None):
    if args.threads:
        torch.set_num_threads(args.threads)
    if items is None:
        items = load_prompts(args.prompts, args.n_prompts, args.prompt_seed)[:args.limit]
    variants = variants or parse_variants(args.methods, args.targets)
    judges = load_judges(args.judge, args)
    for item in items:
        if item["objects"] is None:
            item["objects"] = judges.objects_for(item["prompt"])
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    from minisd.loading import load_model
    from minisd.pipeline import Pipeline
    from minisd.pipeline_sd3 import SD3Pipeline
    model = load_model(ckpt, device=args.device, dtype=getattr(torch, args.dtype))
    pipe = (SD3Pipeline if model.cfg.is_sd3 else Pipeline).from_model(model, ckpt)
    s = Settings(args.steps or pipe.cfg.default_steps, pipe.cfg.default_guidance if args.guidance is None
                 else args.guidance, args.size or pipe.cfg.image_size, args.layers, args.edit_steps)
    ckpt_hash = file_hash(ckpt)
    settings = (f"steps={s.steps} guidance={s.guidance} size={s.size} layers={s.layers} edit_steps={s.edit_steps} "
                f"judge={judges.settings} checkpoint={ckpt_hash}"
                + (f" dtype={args.dtype}" if args.dtype != "float32" else ""))
    out = Path(args.out)
    units = [(i, item, seed) for i, item in enumerate(items) for seed in range(args.seed, args.seed + args.seeds)]
    names = [v.name for v in variants]

    # rank 0 reads what is done and deals out the rest; an error there (other settings) stops every rank
    news = [None]
    if rank == 0:
        try:
            (out / "parts").mkdir(parents=True, exist_ok=True)
            have = set(done_rows(out, settings))
            todo = [k for k, (_, item, seed) in enumerate(units)
                    if any((item["prompt"], str(seed), n) not in have for n in names)]
            attempt = 1 + max((int(PART.fullmatch(p.name).group(1)) for p in part_files(out)), default=0)
            news = [dict(have=have, todo=todo, attempt=attempt)]
        except (ValueError, OSError) as e:
            news = [dict(error=str(e))]
    if world > 1:
        import torch.distributed as dist
        dist.broadcast_object_list(news, src=0, group=group)
    news = news[0]
    if "error" in news:
        raise ValueError(news["error"])
    have, todo = news["have"], news["todo"]
    mine = [units[k] for k in todo[rank::world]]
    log(f"{len(units)} prompt x seed ({len(units) - len(todo)} already in {out}), {world} rank(s), methods "
        f"{', '.join(names)}, {s.steps} steps, guidance {s.guidance}, {s.size} px")

    examples, kill_after = [], kill_switch(rank)
    if mine:
        generate(pipe, items[0]["prompt"], 0, Settings(1, s.guidance, s.size))  # warm-up, kept out of the timings
        bar = tqdm(total=len(todo) * len(variants), desc="images (at most)", unit="img", disable=rank != 0)
        path = out / "parts" / f"part-{news['attempt']:04d}-rank{rank:05d}.csv"
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            for n, (i, item, seed) in enumerate(mine, 1):
                # a unit already partly done draws plain again (the others' drift is measured against it) and
                # only the variants it lacks
                need = [v for v in variants if v.name == "plain" or (item["prompt"], str(seed), v.name) not in have]
                unit = evaluate_one(pipe, item, seed, need, judges.presence, s,
                                    want_maps=len(examples) < args.examples, on_image=lambda: bar.update(world),
                                    scorers=judges.scorers)
                writer.writerows(dict(r, prompt_id=i, settings=settings) for r in unit.rows
                                 if (item["prompt"], str(seed), r["method"]) not in have)
                f.flush()   # a killed rank keeps every finished prompt x seed
                os.fsync(f.fileno())
                if unit.maps:
                    unit.prompt_id = i
                    examples.append(unit)
                if n == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        bar.close()

    if world > 1:   # waits for every rank to finish its units
        import torch.distributed as dist
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(examples, gathered, dst=0, group=group)
        examples = [u for part in gathered or [] for u in part]
    if rank != 0:
        return None
    examples = sorted(examples, key=lambda u: (u.prompt_id, int(u.rows[0]["seed"])))[:args.examples]

    wanted = {(item["prompt"], str(seed), n) for _, item, seed in units for n in names}
    order = {n: k for k, n in enumerate(names)}
    merged = sorted(done_rows(out, settings).values(),
                    key=lambda r: (int(r["prompt_id"]), int(r["seed"]), order.get(r["method"], len(order)),
                                   r["method"]))
    write_csv(out / "results.csv", merged)
    rows = [r for r in merged if (r["prompt"], r["seed"], r["method"]) in wanted]
    summary = summarise(rows, names)
    table = format_table(summary)
    header = [f"# Semantic fidelity: {len(items)} prompts x {args.seeds} seeds", "",
              "    " + (getattr(args, "command", None) or "python -m tools.eval " + shlex.join(args.argv)), "",
              f"Checkpoint `{repo_path(ckpt)}` (sha256 {ckpt_hash}), {s.steps} steps, guidance {s.guidance}, "
              f"{s.size} px, "
              f"judge `{judges.settings}` ({summary['plain']['judged']} of {len(units)} plain images judged), "
              f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {world} rank(s), {torch.get_num_threads()} torch "
              f"threads each on {args.device if world == 1 else torch.device(args.device).type}.",
              "", TYPE_DEFINITIONS if any("presence" in m["types"] for m in summary.values()) else DEFINITIONS, ""]
    paper = []
    if str(args.prompts) == "ae" and {v.method for v in variants} <= set(PAPER_AE):
        paper = ["", "Beside the Attention Regulation paper's figures on the same prompts (theirs: its detector, its "
                 "CLIP, time on its GPU):", "", paper_table(summary, variants)]
        table += "\n" + "\n".join(paper)
    (out / "table.md").write_text("\n".join(header + [table, ""]))
    if examples:
        examples_sheet(examples).save(out / "examples.png")
    log(table)
    log(f"wrote {out / 'results.csv'}, {out / 'table.md'}" +
        (f", {out / 'examples.png'} ({len(examples)} examples)" if examples
         else " (no new image where plain missed an object: no examples.png)"))
    return summary


def list_prompts(args):
    """Print the prompt set, one line per prompt: id, prompt, objects, the target words of --targets."""
    items = load_prompts(args.prompts, args.n_prompts, args.prompt_seed)[:args.limit]
    modes = TARGET_MODES if args.targets == "both" else (args.targets,)
    for i, item in enumerate(items):
        objects = "?" if item["objects"] is None else "; ".join(o if isinstance(o, str) else " ".join(o)
                                                               for o in item["objects"])
        print(f"{i}\t{item['prompt']}\t{objects}\t" + "\t".join(" ".join(target_words(item, m)) for m in modes))
    print(f"{len(items)} prompts", file=sys.stderr)
    return items


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--prompts", default=None, help="'ae' (Attend-and-Excite's 276 prompts, tools/data), a JSONL "
                    "file of {prompt, objects, targets} or a text file of prompts (default: the held-out two-object "
                    "shapes prompts)")
    ap.add_argument("--list-prompts", action="store_true", help="print the prompts and their target words, and stop")
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
    ap.add_argument("--judge", default="tools.testbed.judge:ShapesJudge",
                    help="module:attr[,module:attr...]: one judge of presence (tools.testbed.judge, "
                         "tools.eval.real_judges:"
                         "OwlDetector) and any scorers (tools.eval.real_judges:ClipScore); their own flags appear in "
                         "--help when they are named")
    ap.add_argument("--examples", type=int, default=8, help="rows of examples.png")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun each rank takes cuda:LOCAL_RANK)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="model dtype (bfloat16 on GPUs for SD 1.5; attention softmax stays float32 where observed)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default="eval")
    return ap


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    try:
        add_judge_arguments(ap, argv)
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    args = ap.parse_args(argv)
    args.argv = argv
    for name in ("seeds", "n_prompts", "limit", "steps", "size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    try:
        if args.list_prompts:
            return list_prompts(args)
        return run(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
