"""The Attention Regulation paper's comparison table, in miniature and fair: every method as its authors run it,
each given the same tuning budget on a validation set disjoint from the test set, then the test set run once.

    python -m tools.eval.paper_table validate --out eval/paper-table     # the grid on the validation set
    python -m tools.eval.paper_table test --out eval/paper-table         # defaults and tuned, 100 prompts x 4 seeds
    torchrun --standalone --nproc-per-node 2 -m tools.eval.paper_table validate --threads 1 ...   # 2 ranks

The protocol (docs/evaluation.md states it, with the decision rules, before any run):
  - Validation: the 20 held-out pairs that the 100 test prompts do not name, two prompts each (their own
    templates and order), image seeds 100 and 101: 80 images per setting. No test prompt, pair or seed.
  - Each method's one knob (its `knob` in regulation.editors.METHODS: the one its authors' README or demo tells
    users to turn) at the same four multiples of its authors' default, 1/4, 1/2, 1 and 2 (Attention Regulation's
    edit steps rounded half up: 6, 13, 25, 50 of 50).
  - Choice: the highest presence on validation; ties: the higher strict; then the authors' default if tied, else
    the smaller value (nearer the plain model). Frozen in choices.json before the test stage reads it.
  - Test: the 100 test prompts x seeds 0..3 once, every method at its authors' default and at its choice (the
    same run when they agree), plus DenseDiffusion without its phrase-embedding swap (an ablation), each image
    also scored by the shapes world's tiny CLIP (tools/testbed/clipscore.py).
Both stages resume where they stopped (tools.eval's part files) and refuse results of other settings.
"""
import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np

from regulation.editors import METHODS as TABLE
from tools.eval import evaluate
from tools.testbed import shapes

MULTIPLES = (0.25, 0.5, 1.0, 2.0)
METHODS = tuple(TABLE)   # every method of the table, in the paper's order
VALIDATION_SEED = 100   # image seeds 100, 101: none of the test's 0..3
TEST_PROMPTS, TEST_SEEDS = 100, 4
JUDGE = "tools.testbed.judge:ShapesJudge"
SCORER = "tools.testbed.clipscore:ClipScore"
# The paper's table (its project page's comparison figure): SD on the Attend-and-Excite prompts, detection rate,
# CLIP score, LPIPS to the original image (lower: closer), time overhead (the same column for both datasets).
# DenseDiffusion has no A&E-set row there: its COCO row is given. (detection, CLIP, LPIPS, overhead, dataset)
PAPER = {"plain": ("46.7%", "0.324", "-", "-", "A&E"),
         "regulate": ("66.2%", "0.337", "0.666", "+48.8%", "A&E"),
         "attend-excite": ("60.8%", "0.331", "0.508", "+414.6%", "A&E"),
         "syngen": ("61.4%", "0.326", "0.423", "+378.0%", "A&E"),
         "dense": ("64.0%", "0.332", "0.729", "+79.3%", "COCO"),
         "composable": ("19.4%", "0.307", "0.598", "+119.5%", "A&E")}


def validation_prompts(per_pair=2, seed=1):
    """The held-out pairs that the test's 100 prompts do not name, `per_pair` prompts each (a template and an
    order drawn from their own generator): dict(prompt=..., objects=[(colour, shape), ...])."""
    test = shapes.benchmark_prompts(TEST_PROMPTS, 0)
    named = {frozenset(map(tuple, d["objects"])) for d in test}
    rng = np.random.default_rng(seed)
    out = []
    for pair in shapes.held_out_pairs():
        if frozenset(pair) in named:
            continue
        for _ in range(per_pair):
            keys = [pair[j] for j in rng.permutation(2)]
            out.append(dict(prompt=shapes.caption_for(keys, rng, shuffle=False), objects=[tuple(k) for k in keys]))
    return out


def test_prompts():
    return [dict(prompt=d["prompt"], objects=[tuple(o) for o in d["objects"]])
            for d in shapes.benchmark_prompts(TEST_PROMPTS, 0)]


def default_value(method, guidance):
    knob = TABLE[method].knob
    return guidance if knob.default is None else knob.default


def grid_values(method, guidance):
    """The four values of a method's knob: MULTIPLES of its authors' default (edit steps: whole steps, half up)."""
    d = default_value(method, guidance)
    if TABLE[method].knob.option == "edit_steps":
        return [int(math.floor(d * m + 0.5)) for m in MULTIPLES]
    return [d * m for m in MULTIPLES]


def beyond_edge(method, grid, choice):
    """Rule 8 (docs/evaluation.md): where the choice is the grid's smallest or largest value, the next two values
    of the grid's own spacing past that edge (x1/2 below, x2 above; edit steps whole, half up, at least 1);
    [] where it lies inside."""
    lo, hi = min(grid), max(grid)
    if choice not in (lo, hi):
        return []
    factors = (0.5, 0.25) if choice == lo else (2.0, 4.0)
    values = [choice * f for f in factors]
    if TABLE[method].knob.option == "edit_steps":
        values = [max(1, int(math.floor(v + 0.5))) for v in values]
    return [v for v in values if v not in grid]


def extend_grid(saved, methods):
    """Rule 8 on a finished validation stage's record (choices.json): each of `methods` whose choice sits on its
    grid's edge gets beyond_edge's values. -> (grid, {method: every value added by rule 8 so far}, the choices
    before any extension). An earlier extension's values stay on the record."""
    grid = {m: list(v) for m, v in saved["grid"].items()}
    extended = {m: list(v) for m, v in saved.get("extended", {}).items()}
    for m in methods:
        extended[m] = extended.get(m, []) + beyond_edge(m, grid[m], saved["choices"][m])
        grid[m] = sorted(set(grid[m] + extended[m]))
    return grid, extended, saved.get("choices_before_extension", saved["choices"])


def variant(method, value=None, guidance=5.0, **more):
    """The tools.eval Variant of `method` with its knob at `value` (None: the authors' default, no option
    passed), named as the tables show it."""
    base = {"regulate": "regulate[nouns]", "attend-excite": "attend-excite[nouns]", "syngen": "syngen",
            "dense": "dense[layout given]", "composable": "composable"}[method]
    targets = "nouns" if evaluate.targeted(method) else ""
    options = dict(more)
    name = base
    if value is not None and value != default_value(method, guidance):
        options[TABLE[method].knob.option] = value
        name += f" {TABLE[method].knob.name}={value:g}"
    if more.get("phrase_swap") is False:
        name += " no phrase swap"
    return evaluate.Variant(name, method, targets, options)


def stage_args(args, out, prompts, seed, seeds, scorer):
    """The tools.eval arguments of one stage (its prompts and variants are given to evaluate.run directly)."""
    a = evaluate.build_parser().parse_args([])
    a.checkpoint, a.out, a.threads, a.device, a.examples = args.checkpoint, str(out), args.threads, "cpu", 8
    a.seed, a.seeds, a.judge = seed, seeds, JUDGE + ("," + SCORER if scorer else "")
    a.argv, a.command = [], "python -m tools.eval.paper_table " + shlex.join(args.argv)
    a.n_prompts, a.steps = len(prompts), args.steps
    return a


def guidance_of(args):
    """The model's default guidance (the run's, and Composable Diffusion's default concept weight)."""
    from minisd.loading import load_state
    return load_state(args.checkpoint)[0].default_guidance


# ----------------------------------------------------------------------------------------------------------
# validation: the grid and the choice

def choose(summary, grid, guidance):
    """{method: chosen value} by the stated rule: presence, then strict, then the default, then the smaller."""
    out = {}
    for method, values in grid.items():
        def key(value):
            t = summary[variant(method, value, guidance).name]["types"]
            return (t["presence"][0], t["strict"][0], value == default_value(method, guidance), -value)
        out[method] = max(values, key=key)
    return out


def validation_table(summary, grid, choices, guidance):
    pct = lambda x: f"{100 * x:.1f}%"
    p = summary["plain"]["types"]
    lines = ["| method | knob | value | presence | strict | exact | chosen |", "|---|---|--:|--:|--:|--:|---|",
             f"| plain | | | {pct(p['presence'][0])} | {pct(p['strict'][0])} | {pct(p['exact'][0])} | |"]
    for method, values in grid.items():
        for v in values:
            t = summary[variant(method, v, guidance).name]["types"]
            mark = ("**chosen**" if v == choices[method] else "") + (" (authors' default)"
                                                                      if v == default_value(method, guidance) else "")
            lines.append(f"| {TABLE[method].title} | {TABLE[method].knob.name} | {v:g} | {pct(t['presence'][0])} | "
                         f"{pct(t['strict'][0])} | {pct(t['exact'][0])} | {mark.strip()} |")
    return "\n".join(lines)


def validate(args):
    out = Path(args.out)
    guidance = guidance_of(args)
    grid = {m: grid_values(m, guidance) for m in args.methods}
    extended, before = {}, None
    if args.extend:
        path = out / "choices.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: --extend extends a finished validation stage")
        grid, extended, before = extend_grid(json.loads(path.read_text()), args.methods)
    variants = [evaluate.Variant("plain", "plain", "")] + [variant(m, v, guidance) for m, vs in grid.items()
                                                           for v in vs]
    items = validation_prompts()[:args.limit]
    summary = evaluate.run(stage_args(args, out / "validation", items, VALIDATION_SEED, 2, scorer=False),
                           items=items, variants=variants)
    if summary is None:   # a rank other than 0
        return None
    choices = choose(summary, grid, guidance)
    record = {"rule": "highest validation presence; ties: higher strict, then the authors' default, then the smaller",
              "guidance": guidance, "grid": grid, "choices": choices}
    if args.extend:
        record.update(rule_8="a choice on its grid's edge: two more values past it (x1/2 below, x2 above), chosen "
                      "again over the extended grid", extended={m: v for m, v in extended.items() if v},
                      choices_before_extension=before)
    (out / "choices.json").write_text(json.dumps(record, indent=1) + "\n")
    text = ["# Validation: each method's knob at four values", "",
            "    python -m tools.eval.paper_table " + shlex.join(args.argv), "",
            f"{len(items)} prompts (the {len(items) // 2} held-out pairs the test prompts do not name, two prompts "
            f"each) x image seeds {VALIDATION_SEED} and {VALIDATION_SEED + 1}; every other setting as the test's. "
            "Rule (docs/evaluation.md, written before the run): the highest presence; ties: the higher strict, "
            "then the authors' default, then the smaller value. Full table: validation/table.md.", "",
            validation_table(summary, grid, choices, guidance), ""]
    if args.extend:
        moved = [f"{TABLE[m].title} {before[m]:g} -> {choices[m]:g}" for m in grid if choices[m] != before[m]]
        text[-2:-2] = ["Extended by rule 8 (docs/evaluation.md: a choice on its grid's edge gets the next two values "
                       "past it): " + "; ".join(f"{TABLE[m].title} {', '.join(f'{v:g}' for v in vs)}"
                                              for m, vs in extended.items() if vs)
                       + ". Choices moved: " + ("; ".join(moved) or "none") + ".", ""]
    (out / "validation.md").write_text("\n".join(text))
    print("\n".join(text))
    return choices


def type_cells(t):
    """presence, strict and exact table cells, each with its difference from plain and interval."""
    pct = lambda x: f"{100 * x:.1f}%"
    ci = lambda c: "" if c is None else " ({:+.1f} [{:+.1f}, {:+.1f}])".format(*c)
    return " | ".join(f"{pct(t[k][0])}{ci(t[k][1])}" for k in ("presence", "strict", "exact"))


def bands(depth, n=3):
    """The joint blocks cut into `n` consecutive bands of (nearly) equal size: [[0, 1], [2, 3], [4, 5]] for 6."""
    edges = [round(k * depth / n) for k in range(n + 1)]
    return [list(range(a, b)) for a, b in zip(edges, edges[1:]) if b > a]


def blocks(args):
    """Which joint blocks to regulate, measured: Attention Regulation at its authors' defaults on the validation
    set, one band of an MMDiT's blocks at a time, beside plain (docs/sd3.md states the rule that turns this into
    the default before it is read)."""
    from minisd.loading import load_state
    cfg = load_state(args.checkpoint)[0]
    if not cfg.is_sd3:
        raise SystemExit(f"error: {args.checkpoint} is not an SD 3 file: the blocks stage measures joint blocks")
    groups = bands(cfg.mmdit.depth, args.bands)
    out = Path(args.out)
    variants = [evaluate.Variant("plain", "plain", "")] + [
        evaluate.Variant(f"regulate[nouns] blocks {g[0]}-{g[-1]}", "regulate", "nouns",
                         dict(layers=",".join(map(str, g)))) for g in groups]
    items = validation_prompts()[:args.limit]
    summary = evaluate.run(stage_args(args, out / "blocks", items, VALIDATION_SEED, 2, scorer=False),
                           items=items, variants=variants)
    if summary is None:
        return None
    lines = ["| blocks | fraction of depth | presence | strict | exact |", "|---|---|--:|--:|--:|"]
    for v, g in zip(variants, [None] + groups):
        t = summary[v.name]["types"]
        where = "" if g is None else f"[{g[0] / cfg.mmdit.depth:.2f}, {(g[-1] + 1) / cfg.mmdit.depth:.2f})"
        lines.append(f"| {'plain' if g is None else f'{g[0]}-{g[-1]}'} | {where} | {type_cells(t)} |")
    text = ["# Which joint blocks: Attention Regulation one band at a time", "",
            "    python -m tools.eval.paper_table " + shlex.join(args.argv), "",
            f"{len(items)} validation prompts x image seeds {VALIDATION_SEED} and {VALIDATION_SEED + 1} (no test "
            f"prompt, pair or seed); Attention Regulation at its authors' defaults on the blocks named, "
            f"{cfg.mmdit.depth} joint blocks in all. In brackets: the difference from plain in points with its 95% "
            "paired-bootstrap interval over prompts. The rule that reads this table: docs/sd3.md.", "",
            "\n".join(lines), ""]
    (out / "blocks.md").write_text("\n".join(text))
    print("\n".join(text))
    return summary


def options(args):
    """The joint loss's open questions, measured: Attention Regulation with one map per target column (its spec's
    k) against one map per word (RegulationConfig.per_word), Attend-and-Excite on the joint probabilities against
    on maps renormalised over the text (AttendExciteConfig.joint_maps), each at its authors' defaults on the
    validation set. Each variant names its setting, so the rows stay true whichever becomes the default."""
    from minisd.loading import load_state
    from regulation.attend_excite import AttendExciteConfig
    from regulation.attention_regulation import RegulationConfig
    if not load_state(args.checkpoint)[0].is_sd3:
        raise SystemExit(f"error: {args.checkpoint} is not an SD 3 file: the options stage measures joint attention")
    out = Path(args.out)
    variants = [evaluate.Variant("plain", "plain", ""),
                evaluate.Variant("regulate[nouns] map per column", "regulate", "nouns",
                                 dict(config=RegulationConfig(per_word=False))),
                evaluate.Variant("regulate[nouns] map per word", "regulate", "nouns",
                                 dict(config=RegulationConfig(per_word=True))),
                evaluate.Variant("attend-excite[nouns] joint maps", "attend-excite", "nouns",
                                 dict(config=AttendExciteConfig(joint_maps="joint"))),
                evaluate.Variant("attend-excite[nouns] maps over the text", "attend-excite", "nouns",
                                 dict(config=AttendExciteConfig(joint_maps="text")))]
    items = validation_prompts()[:args.limit]
    summary = evaluate.run(stage_args(args, out / "options", items, VALIDATION_SEED, 2, scorer=False),
                           items=items, variants=variants)
    if summary is None:
        return None
    lines = ["| variant | presence | strict | exact |", "|---|--:|--:|--:|"]
    for v in variants:
        t = summary[v.name]["types"]
        lines.append(f"| {v.name} | {type_cells(t)} |")
    text = ["# The joint loss's options, on the validation set", "",
            "    python -m tools.eval.paper_table " + shlex.join(args.argv), "",
            f"{len(items)} validation prompts x image seeds {VALIDATION_SEED} and {VALIDATION_SEED + 1}; each method "
            "at its authors' defaults on the model's default blocks. In brackets: the difference from plain in "
            "points with its 95% paired-bootstrap interval over prompts. The rules that read this table: docs/sd3.md.",
            "", "\n".join(lines), ""]
    (out / "options.md").write_text("\n".join(text))
    print("\n".join(text))
    return summary


# ----------------------------------------------------------------------------------------------------------
# test: the table in the paper's shape

def test_variants(choices, guidance, methods):
    """Plain; each method at its authors' default and at its choice (one variant when they agree); DenseDiffusion
    without the phrase swap (ablation)."""
    out = [evaluate.Variant("plain", "plain", "")]
    for m in methods:
        out.append(variant(m, None, guidance))
        tuned = variant(m, choices[m], guidance) if choices else out[-1]
        if tuned.name != out[-1].name:
            out.append(tuned)
        if m == "dense":
            out.append(variant(m, None, guidance, phrase_swap=False))
    return out


def paper_shape(summary, choices, guidance, methods):
    """One row per method and setting: presence (the paper's detection rate), strict, exact (each with its
    interval against plain), the tiny CLIP's score, SSIM and MAD against plain, overhead; the paper's values
    beside."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    ci = lambda c: "" if c is None else " ({:+.1f} [{:+.1f}, {:+.1f}])".format(*c)
    base = summary["plain"]["seconds"]
    lines = ["| method | setting | presence | strict | exact | CLIP | SSIM | MAD | overhead | paper: detection | "
             "paper: CLIP | paper: LPIPS | paper: overhead |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]

    def row(label, setting, name, method):
        m = summary[name]
        t = m["types"]
        clip = m["scores"].get("clip")
        det, pclip, lpips, over, data = PAPER[method]
        paper = f"{det} ({data}) | {pclip} | {lpips} | {over}" if setting in ("", "authors' defaults") \
            else " | | |"
        overhead = "-" if method == "plain" else f"{m['seconds'] / base - 1:+.0%}"
        if setting.startswith("tuned") and "(= default)" not in setting:
            overhead += " *"   # drawn by the resumed command, plain's seconds by the first: another load
        lines.append(f"| {label} | {setting} | {pct(t['presence'][0])}{ci(t['presence'][1])} | "
                     f"{pct(t['strict'][0])}{ci(t['strict'][1])} | {pct(t['exact'][0])}{ci(t['exact'][1])} | "
                     f"{'n/a' if clip is None else f'{clip:.3f}'} | {m['ssim']:.3f} | {m['mad']:.4f} | {overhead} | "
                     f"{paper} |")
    row("plain SD", "", "plain", "plain")
    for method in methods:
        d = default_value(method, guidance)
        row(TABLE[method].title, "authors' defaults", variant(method, None, guidance).name, method)
        if choices:
            same = choices[method] == d
            row("", f"tuned: {TABLE[method].knob.name} {choices[method]:g}" + (" (= default)" if same else ""),
                variant(method, choices[method], guidance).name, method)
        if method == "dense":
            row("", "ablation: no phrase swap", variant(method, None, guidance, phrase_swap=False).name, method)
    return "\n".join(lines)


def test(args):
    out = Path(args.out)
    path = out / "choices.json"
    if args.defaults_only:   # the rows that need no choice, first (the same rows the full stage then resumes)
        choices = None
    elif not path.is_file():
        raise SystemExit(f"error: {path} not found: run the validation stage first (python -m tools.eval.paper_table "
                         f"validate --out {args.out})")
    guidance = guidance_of(args)
    if not args.defaults_only:
        choices = json.loads(path.read_text())["choices"]
        missing = [m for m in args.methods if m not in choices]
        if missing:
            raise SystemExit(f"error: {path} has no choice for {', '.join(missing)}")
    items = test_prompts()[:args.limit]
    summary = evaluate.run(stage_args(args, out / "test", items, 0, TEST_SEEDS, scorer=True), items=items,
                           variants=test_variants(choices, guidance, args.methods))
    if summary is None:
        return None
    table = ["# The paper's table, in miniature", "",
             "    python -m tools.eval.paper_table " + shlex.join(args.argv), "",
             f"{len(items)} test prompts (one held-out pair each) x seeds 0..{TEST_SEEDS - 1}, run once, on "
             f"`{evaluate.repo_path(Path(args.checkpoint))}` (its defaults: steps, guidance, size). Each method at "
             "its authors' defaults and at the value chosen on the validation set (validation.md, choices.json); the "
             "full table with every failure type is test/table.md, the rows test/results.csv.", "",
             "- presence: every named shape drawn (any colour): the paper's detection rate. strict: every named "
             "object in its colour. exact: strict and no extra object. In brackets: the difference from plain in "
             "points with its 95% paired-bootstrap interval over prompts.",
             "- CLIP: the shapes world's tiny CLIP (tools/testbed/clipscore.py), cosine of the image and the prompt.",
             "- SSIM, MAD: against the plain image of the same prompt and seed (the paper's LPIPS needs a network "
             "this machine cannot download). Overhead: seconds per image against plain's, both measured by this "
             "command on one machine, 2 ranks of 1 thread (the defaults' rows and plain's first, with "
             "--defaults-only; the tuned rows later, each unit drawing plain again beside them).",
             "- paper: the Attention Regulation paper's figures on SD (the Attend-and-Excite prompts; DenseDiffusion "
             "has only a COCO row there), for reference: another model, another judge, another scale.", "",
             paper_shape(summary, choices, guidance, args.methods), "",
             "\\* seconds of the tuned rows were measured by the resumed command (`test` after `--defaults-only`), "
             "plain's by the first, under another load of the same machine: compare the tuned rows' overhead "
             "with each other, not with plain's.", ""]
    (out / "table.md").write_text("\n".join(table))
    print("\n".join(table))
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m tools.eval.paper_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["validate", "test", "blocks", "options"])
    ap.add_argument("--out", default="eval/paper-table")
    ap.add_argument("--checkpoint", default=str(evaluate.DEFAULT_CHECKPOINT))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods of the table")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    ap.add_argument("--defaults-only", action="store_true", help="test stage: only plain, the authors' defaults and "
                    "the ablation (no choices needed); the full test stage then adds the tuned rows")
    ap.add_argument("--extend", action="store_true", help="validate stage: rule 8, extend the saved grid past the "
                    "edge where a method's choice (of --methods) sits on it, draw only the new values, choose again")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts of the stage (a quick look)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's; a quick look)")
    ap.add_argument("--bands", type=int, default=3, help="blocks stage: the joint blocks cut into this many bands")
    args = ap.parse_args(argv)
    args.argv = argv
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise SystemExit(f"error: unknown method {', '.join(bad)}; choose from {', '.join(METHODS)}")
    try:
        return {"validate": validate, "test": test, "blocks": blocks, "options": options}[args.stage](args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
