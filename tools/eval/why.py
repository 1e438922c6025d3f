"""Why two methods lose on the testbed: measurements behind docs/methods.md's account.

    python -m tools.eval.why phrase-swap              # DenseDiffusion: how far the swapped phrase states move
    python -m tools.eval.why syngen-step --n 20       # SynGen: its latent step against the sampler's own move
    python -m tools.eval.why attend-excite --n 30 --out eval/why-attend-excite   # A&E: loss, tries, step, maps

phrase-swap: DenseDiffusion replaces the prompt's text states at each phrase's tokens by those of the phrase encoded
alone (the authors always do). For each object phrase of the 100 test prompts: |alone - in prompt| / |in prompt| at
its tokens. A large text encoder's states of "red circle" barely depend on the words around it; a 3-layer one's may.

syngen-step: over the first 25 steps (those SynGen acts in), the size of SynGen's update of the latents (step size x
its gradient) against the sampler's own move in the same step (|x_{i+1} - x_i| without that update), both as RMS
over the latent; also SynGen's loss at its first and last altered step.

attend-excite: on prompts outside the test set (the fair protocol's validation prompts, tools.eval.paper_table,
first n, image seeds 100, 101: the validation's own images), per image and per altered step: Attend-and-Excite's
loss, each target's smoothed maximum (the loss's input) and raw maximum (its map averaged over heads and layers,
before the x100 softmax), the refinement's tries at its threshold steps against max_refinement_steps and whether
the loss reached 1 - threshold, its latent push (refinement and update, RMS) against the sampler's own move; the
same maxima in the plain run of the same seed (an observer, the image unchanged); both images judged, each named
shape drawn or not. Writes OUT/records.jsonl (every number), OUT/summary.json and OUT/summary.md.
"""
import argparse
import json
from pathlib import Path

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


def rms(x):
    return x.float().pow(2).mean().sqrt().item()


def attend_excite_run(pipe, item, seed, strength=None, steps=50, observe_only=False):
    """One image of `item` with Attend-and-Excite (observe_only: the plain image, its maps read by the same hook's
    conditional pass without gradient and without moving the latents). Returns (image, record)."""
    from regulation.attend_excite import target_maxima
    from regulation.editors import choose_targets, set_up
    from tools.eval.evaluate import target_words
    quiet = lambda *a: None
    targets = choose_targets(pipe.tokenizer, item["prompt"], target_words(item, "nouns"), log=quiet)
    hook = set_up("attend-excite", pipe, item["prompt"], steps, targets=targets, strength=strength,
                  log=quiet).hooks[0]
    calls, pushes, sizes, moves, entering, current = [], {}, {}, {}, {}, [None]
    inner_attention, inner_grad, inner_edit = hook._attention, hook.loss_and_grad, hook.edit_latents

    def attention(x, t, cond_unet):   # every conditional pass: the maxima the loss reads, and the raw ones
        attn = inner_attention(x, t, cond_unet)
        a = attn.detach()[0]
        # the first word's column dropped too (its softmax share 0), as A&E drops <sot>'s: on the shapes world the
        # first word is always an article, never a target
        sinkless = a.clone()
        sinkless[..., 1] = -1e4
        shares = (a[..., 1:-1] * hook.config.temperature).softmax(-1)[..., :hook.eot - 1]   # the prompt's tokens
        calls.append(dict(i=current[0], maxima=target_maxima(a[None], hook.targets, hook.config, hook.eot)[0].tolist(),
                          maxima_first_dropped=target_maxima(sinkless[None], hook.targets, hook.config, hook.eot)[0]
                          .tolist(),
                          raw=[a[..., p].amax().item() for p in hook.targets],
                          prompt_share=shares.sum(-1).mean().item(), token_max=shares.amax(dim=(0, 1)).tolist()))
        return attn

    def loss_and_grad(x, t, cond_unet):
        loss, grad = inner_grad(x, t, cond_unet)
        calls[-1].update(loss=loss[0].item(), grad=rms(grad))
        return loss, grad

    def edit(x, t, i, cond_unet):     # the start of step i, before the model
        current[0] = i
        if observe_only:
            if i < hook.config.max_iter_to_alter:
                with torch.no_grad():
                    attention(x, t, cond_unet)
            out = x
        else:
            out = inner_edit(x, t, i, cond_unet)
        pushes[i] = rms(out.float() - x.float())
        sizes[i] = rms(x)
        entering[i] = out.detach().float().clone()
        return out

    def callback(info):               # after step i: the sampler's own move, from what entered it
        if info["i"] in entering:
            moves[info["i"]] = rms(info["x"].float() - entering.pop(info["i"]))

    hook._attention, hook.loss_and_grad, hook.edit_latents = attention, loss_and_grad, edit
    image = pipe(item["prompt"], steps=steps, seed=seed, hooks=[hook], callback=callback).images[0]
    per_step = {}
    for c in calls:
        per_step.setdefault(c["i"], []).append({k: v for k, v in c.items() if k != "i"})
    ids = pipe.tokenizer.ids(item["prompt"])   # token_max's columns: the prompt's tokens 1..eot-1
    record = dict(targets=[t.word for t in targets], positions=hook.targets,
                  tokens=[pipe.tokenizer.token_text(ids[p]) for p in range(1, hook.eot)], steps={})
    for i, passes in sorted(per_step.items()):
        h = hook.history.get(i, {})
        record["steps"][i] = dict(passes=passes, push=pushes.get(i), move=moves.get(i), x=sizes.get(i),
                                  step_size=h.get("step_size"),
                                  tries=h.get("tries"), gave_up=(h.get("gave_up") or [None])[0],
                                  loss_refined=(h.get("loss_refined") or [None])[0])
    return image, record


def judged(image, objects):
    """The judge's failure types of an image and, per named object, whether its shape was drawn at all."""
    from tools.testbed.judge import ShapesJudge, detect
    arr = np.asarray(image.convert("RGB"))
    seen = [d.shape for d in detect(arr)]
    return ({k: bool(v) for k, v in ShapesJudge().failures(arr, objects).items()},
            [shape in seen for _, shape in objects])


def auc(scores, labels):
    """P(score of a positive > score of a negative), ties half: how well a number tells drawn from left out."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    return float(np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg]))


def attend_excite(pipe, items, seeds, strength=None, out=None, check=None, steps=50, plain_only=False, log=print):
    """The probe (module docstring). check: a tools.eval results.csv holding the same prompts and seeds (the
    validation's): how many of this run's images the judge calls as it called that run's."""
    from regulation.attend_excite import AttendExciteConfig
    config = AttendExciteConfig()
    records = []
    for item in items:
        for seed in seeds:
            rec = dict(prompt=item["prompt"], objects=item["objects"], seed=seed)
            for kind in ("plain",) if plain_only else ("plain", "ae"):
                image, r = attend_excite_run(pipe, item, seed, strength, steps, observe_only=kind == "plain")
                rec[kind] = dict(r, **dict(zip(("types", "drawn"), judged(image, item["objects"]))))
            records.append(rec)
            log(f"{len(records)}: {item['prompt']!r} seed {seed}: plain presence {rec['plain']['types']['presence']}"
                + ("" if plain_only else f", A&E {rec['ae']['types']['presence']}"))
    summary = first_word_summary(records) if plain_only else summarise(records, config)
    if check:
        import csv
        name = "attend-excite[nouns]" + ("" if strength in (None, config.scale_factor) else f" step size={strength:g}")
        rows = {(r["prompt"], int(r["seed"]), r["method"]): json.loads(r["types"]) for r in csv.DictReader(open(check))}
        pairs = [(rows.get((r["prompt"], r["seed"], m)), r[k]["types"]) for r in records
                 for m, k in (("plain", "plain"), (name, "ae")) if k in r]
        summary["same_as_check"] = dict(file=check, compared=sum(a is not None for a, _ in pairs),
                                        same=sum(a is not None and all(bool(a[t]) == b[t] for t in a)
                                                 for a, b in pairs))
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "records.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if not plain_only:
            (out / "summary.md").write_text(summary_markdown(summary))
    return summary


def first_word_summary(records):
    """Plain runs only: the targets' smoothed maxima as A&E computes them and with the first word's column dropped
    too, per step (medians), and how well each tells a drawn shape from a left-out one (AUC)."""
    med = lambda xs: float(np.median(xs)) if len(xs) else None
    out = []
    for i in sorted({int(i) for r in records for i in r["plain"]["steps"]}):
        row = dict(step=i)
        for key in ("maxima", "maxima_first_dropped"):
            m = [r["plain"]["steps"][i]["passes"][0][key] for r in records]
            row[key] = dict(weaker=med([min(x) for x in m]), stronger=med([max(x) for x in m]),
                            auc=auc([v for x in m for v in x], [d for r in records for d in r["plain"]["drawn"]]))
        out.append(row)
    return dict(images=len(records), per_step=out)


def summary_markdown(summary):
    """summary.json's per-step medians and its refinement as two tables."""
    f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"
    lines = ["| step | loss (A&E run) | weaker target's max, A&E run | plain run: weaker max | plain: stronger max | "
             "plain: weaker raw max | conditional passes | step size | grad RMS | push RMS | sampler move RMS | "
             "push / move | latent RMS |", "|" + "--:|" * 13]
    for r in summary["per_step"]:
        lines.append(f"| {r['step']} | {f(r['loss'])} | {f(r['min_max_ae'])} | {f(r['min_max_plain'])} | "
                     f"{f(r['max_max_plain'])} | {f(r['raw_min_plain'])} | {r['passes']:.1f} | "
                     f"{f(r['step_size'], 1)} | "
                     f"{f(r['grad'], 5)} | {f(r['push'], 4)} | {f(r['move'], 4)} | {f(r['push_over_move'], 2)} | "
                     f"{f(r['x'], 2)} |")
    lines += ["", "| threshold step | threshold | loss goal | images refined | mean tries | hit the cap (20) | "
              "gave up | loss before | loss after | push RMS | push / move |", "|" + "--:|" * 11]
    for i, r in summary["refinement"].items():
        lines.append(f"| {i} | {r['threshold']} | {f(r['goal_loss'], 2)} | {r['refined']} of {r['images']} | "
                     f"{r['tries_mean']:.1f} | {r['hit_max']} | {r['gave_up']} | {f(r['loss_before'])} | "
                     f"{f(r['loss_after'])} | {f(r['push'], 4)} | {f(r['push_over_move'], 2)} |")
    return "\n".join(lines) + "\n"


def summarise(records, config):
    """Medians over images per altered step; the refinement at each threshold step; the outcomes."""
    med = lambda xs: float(np.median(xs)) if len(xs) else None
    steps = sorted({int(i) for r in records for i in r["ae"]["steps"]})
    per_step = []
    for i in steps:
        a = [r["ae"]["steps"][i] for r in records if i in r["ae"]["steps"]]
        p = [r["plain"]["steps"][i] for r in records if i in r["plain"]["steps"]]
        first = [s["passes"][0] for s in a]
        per_step.append(dict(
            step=i, loss=med([f["loss"] for f in first]),
            min_max_ae=med([min(f["maxima"]) for f in first]),
            min_max_plain=med([min(s["passes"][0]["maxima"]) for s in p]),
            max_max_plain=med([max(s["passes"][0]["maxima"]) for s in p]),
            raw_min_plain=med([min(s["passes"][0]["raw"]) for s in p]),
            prompt_share_plain=med([s["passes"][0]["prompt_share"] for s in p]),
            passes=float(np.mean([len(s["passes"]) for s in a])),
            push=med([s["push"] for s in a]), move=med([s["move"] for s in a]), x=med([s["x"] for s in a]),
            push_over_move=med([s["push"] / s["move"] for s in a if s["move"]]),
            plain_move=med([s["move"] for s in p]), grad=med([f["grad"] for f in first]),
            step_size=a[0]["step_size"]))
    refinement = {}
    for i, threshold in sorted(config.thresholds.items()):
        a = [r["ae"]["steps"][i] for r in records if i in r["ae"]["steps"]]
        if not a:
            continue
        goal = 1 - threshold
        refined = [s for s in a if s["passes"][0]["loss"] > goal]
        refinement[i] = dict(
            threshold=threshold, goal_loss=goal, images=len(a), refined=len(refined),
            tries_mean=float(np.mean([s["tries"] for s in refined])) if refined else 0.0,
            hit_max=sum(s["tries"] >= config.max_refinement_steps for s in refined),
            gave_up=sum(bool(s["gave_up"]) for s in refined),
            loss_before=med([s["passes"][0]["loss"] for s in refined]),
            loss_after=med([s["loss_refined"] for s in refined if s["loss_refined"] is not None]),
            push=med([s["push"] for s in refined]), push_over_move=med([s["push"] / s["move"] for s in refined]))
    # does the loss's input see the neglect? a named shape drawn or left out by plain, against its smoothed max
    seen = {}
    for i in (0, 5, 10, 20):
        scores, labels = [], []
        for r in records:
            s = r["plain"]["steps"].get(i)
            if s:
                scores += s["passes"][0]["maxima"]
                labels += r["plain"]["drawn"]
        seen[i] = dict(auc=auc(scores, labels), left_out_median=med([x for x, y in zip(scores, labels) if not y]),
                       drawn_median=med([x for x, y in zip(scores, labels) if y]),
                       left_out=labels.count(False), drawn=labels.count(True))
    types = list(records[0]["plain"]["types"])
    outcome = {k: dict(plain=sum(r["plain"]["types"][k] for r in records), ae=sum(r["ae"]["types"][k]
                                                                                 for r in records)) for k in types}
    broke = [r for r in records if r["plain"]["types"]["presence"] and not r["ae"]["types"]["presence"]]
    fixed = [r for r in records if not r["plain"]["types"]["presence"] and r["ae"]["types"]["presence"]]
    how = lambda rs: {k: sum(r["ae"]["types"][k] for r in rs) for k in ("omission", "wrong_shape", "extra")}
    return dict(images=len(records), per_step=per_step, refinement=refinement, maxima_vs_drawn=seen,
                outcome=outcome, broke=len(broke), fixed=len(fixed), broke_as=how(broke),
                fixed_from={k: sum(r["plain"]["types"][k] for r in fixed) for k in ("omission", "wrong_shape")})


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.eval.why", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["phrase-swap", "syngen-step", "attend-excite"])
    ap.add_argument("--n", type=int, default=100, help="prompts: the first n of the benchmark's 100 test prompts "
                    "(attend-excite: of the fair protocol's 40 validation prompts)")
    ap.add_argument("--strength", type=float, default=None, help="syngen-step, attend-excite: the step size "
                    "(default: the authors' 20)")
    ap.add_argument("--seeds", type=int, default=2, help="attend-excite: image seeds 100, 101, ... (the validation's)")
    ap.add_argument("--out", default=None, help="attend-excite: folder for records.jsonl and summary.json")
    ap.add_argument("--plain-only", action="store_true", help="attend-excite: only the plain runs' maxima, as A&E "
                    "computes them and with the first word's column dropped too (the testbed's second sink)")
    ap.add_argument("--check", default=None, help="attend-excite: a results.csv of the same images (the validation's) "
                    "to compare the judge's calls with")
    ap.add_argument("--steps", type=int, default=50, help="attend-excite: sampling steps (50: the table's; fewer: a "
                    "quick look)")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from minisd.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    if args.what == "attend-excite":
        from tools.eval.paper_table import VALIDATION_SEED, validation_prompts
        items = validation_prompts()[:args.n]
        with torch.no_grad():   # A&E's own pass takes its gradient itself
            out = attend_excite(pipe, items, range(VALIDATION_SEED, VALIDATION_SEED + args.seeds), args.strength,
                                args.out, args.check, args.steps, args.plain_only)
        print(json.dumps(out if args.plain_only else {k: v for k, v in out.items() if k != "per_step"}, indent=1))
        return out
    items = shapes.benchmark_prompts(100, 0)[:args.n]
    with torch.no_grad() if args.what == "phrase-swap" else torch.enable_grad():
        out = phrase_swap(pipe, items) if args.what == "phrase-swap" else syngen_step(pipe, items, args.strength)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
