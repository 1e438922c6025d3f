"""python -m minisd.app [--port 7860] [--listen] [--checkpoint FILE]: see inside the attention, in the browser.

A page (Gradio; pip install -e ".[app]") where you type a prompt, pick a method, and see the plain image and the
method's side by side from the same seed, each target word's cross-attention map at the steps the run kept, and
the method's loss. Every Run is a command line: the page writes the `python -m minisd.sample` arguments that remake
it (shown under the images), parses them with the command line's own parser and runs them through
minisd/generate.py, as the command line does. Only the model stays loaded between runs.
"""
import argparse
import html
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from PIL import Image

from .checkpoint import DEFAULT_CHECKPOINT, CheckpointError
from .generate import DTYPES, generate, load_pipeline, prepare, settings
from .images import UsageError, parameters_text, save_image
from .maps import grid
from .pipeline import NonFiniteError
from .sample import build_parser, check_args, one_line
from regulation.editors import METHODS

# The preset: the first (prompt, seed) of the benchmark's fixed order (eval/shapes-methods/results.csv, by prompt_id
# then seed) where plain omits an object and Attention Regulation, with the prompt's nouns, draws every named object
# in its colour (docs/app.md says the rule and how it was checked).
PRESET_PROMPT, PRESET_SEED = "a picture of a green star and a yellow cross", 1
RATE = (f"The preset, \"{PRESET_PROMPT}\" at seed {PRESET_SEED}, is where the shipped model's plain image drops "
        "the star and Attention Regulation brings it back: the first such case in the benchmark's order. One picture "
        "is not the rate: over the benchmark's 400 images (100 held-out prompts x 4 seeds) presence goes "
        "**49.2% -> 58.2%** (+9.0 points, 95% CI [+4.0, +14.2]; eval/paper-table/table.md in the repository).")
MAPS_DIR = "outputs/maps"   # what the shown command writes its grid to; the page itself writes no grid
CELL = 160                  # pixels of one map in the page
# the shipped model's images are 128 px: shown larger, with their pixels kept sharp
CSS = ("#plain-image img, #method-image img {width: 256px !important; height: 256px !important; "
       "object-fit: contain; image-rendering: pixelated} .minisd-error {color: #b91c1c; font-weight: 600}")


class Stopped(Exception):
    """The page's Stop: the run ends at its next step."""


# --- from the page's fields to a command line ------------------------------------------------------------------

def title(method):
    """The method's title (regulation.editors.METHODS), or "plain"."""
    return "plain" if method == "plain" else METHODS[method].title


def targets_label(method):
    """The targets field's label: what it holds for the method (the command line's --targets or --layout)."""
    return {"syngen": "modifier-noun pairs ('green star; yellow cross')",
            "dense": "layout: phrase:x0,y0,x1,y1 per region, as fractions of the image ('star:0.1,0.1,0.5,0.5;"
                     "cross:0.5,0.5,0.9,0.9'), or phrase=mask.png",
            "composable": "concepts ('a green star | a yellow cross')"}.get(method, "target words ('star cross'; "
                                                                             "'dog#2': the second dog)")


def page_words(message, method):
    """A command line's error as the page says it: a flag that a field of the page fills is named by that field."""
    targets = re.split(r" \(|:", targets_label(method))[0]
    fields = {"--prompt": "prompt", "--seed": "seed", "--steps": "steps", "--guidance": "guidance",
              "--method": "method", "--targets": targets, "--layout": targets, "--concept-weights": "concept weights",
              "--compile-optimizer": "compiled optimiser", "--checkpoint": "checkpoint"}
    return re.sub(r"--[a-z][a-z0-9-]*", lambda m: f'the "{fields[m[0]]}" field' if m[0] in fields else m[0], message)


def default_targets(tokenizer, method, prompt):
    """What the command line would pick without --targets (--layout for dense: a box per object, side by side, as
    a start to edit): the text the targets field is filled with."""
    from regulation.composable import split_concepts
    from regulation.targets import auto_targets, modifier_noun_pairs
    kept = tokenizer.kept(prompt)[0]
    try:
        if method == "plain" or METHODS[method].takes_words:
            return " ".join(auto_targets(kept))
        if method == "composable":
            return " | ".join(split_concepts(prompt))
        pairs = modifier_noun_pairs(kept)
        if method == "syngen":
            return "; ".join(" ".join(m + [n]) for m, n in pairs if m)
        k = len(pairs)
        return ";".join(f"{' '.join(m + [n])}:{i / k + 0.05:.2f},0.25,{(i + 1) / k - 0.05:.2f},0.75"
                        for i, (m, n) in enumerate(pairs))
    except ValueError:
        return ""


def page_argv(fields, tokenizer, defaults):
    """The command line of a page's Run: (method's argv, plain's argv), each a list for minisd.sample. Flags
    equal to the command line's defaults are left out, so the command shown is the one a person would type."""
    prompt, seed, steps, guidance, method, targets, weights = (fields[k] for k in (
        "prompt", "seed", "steps", "guidance", "method", "targets", "weights"))
    targets = " ".join(str(targets or "").split())
    # "--prompt=-x": a prompt that starts with "-" would otherwise be taken for a flag
    base = [f"--prompt={prompt}"] if prompt.startswith("-") else ["--prompt", prompt]
    for flag, value in (("--checkpoint", defaults["checkpoint"]), ("--device", defaults["device"]),
                        ("--dtype", defaults["dtype"])):
        if value != defaults["parser"][flag]:
            base += [flag, str(value)]
    if steps is not None and int(steps) != defaults["steps"]:
        base += ["--steps", str(int(steps))]
    if guidance is not None and float(guidance) != defaults["guidance"]:
        base += ["--guidance", f"{float(guidance):g}"]
    if int(seed or 0) != 0:
        base += ["--seed", str(int(seed))]
    auto = " ".join(default_targets(tokenizer, method, prompt).split())
    given = ["--targets", targets] if targets and targets != auto else []
    if method == "plain":
        maps = ["--save-attention", MAPS_DIR] if targets or auto else []   # no object words: no maps
        return base + maps + given, None
    argv = base + ["--method", method]
    entry = METHODS[method]
    if "layout" in entry.takes:   # the field holds DenseDiffusion's layout
        argv += ["--layout", targets]
    else:
        argv += given
    if "weights" in entry.takes and str(weights or "").strip():
        argv += ["--concept-weights", weights]
    if method == "regulate" and fields.get("compile"):
        argv += ["--compile-optimizer"]
    if entry.maps_absent:
        return argv, base   # no maps: Composable Diffusion acts on no attention map
    return argv + ["--save-attention", MAPS_DIR], base + ["--save-attention", MAPS_DIR]


def plain_command(plain_argv, job):
    """The plain image's command line, once the method's layers are known: the page keeps the plain run's maps in
    the method's layers, and which layers are observed decides which leave the SDPA path (their rounding), so the
    command observes the same ones."""
    from regulation.editors import layer_selector
    if plain_argv and "--save-attention" in plain_argv and job.select is not None \
            and list(job.select.specs) != list(layer_selector(job.pipe).specs):
        return plain_argv + ["--regulate-layers", " ".join(job.select.specs)]
    return plain_argv


def command(argv):
    return "python -m minisd.sample " + shlex.join(argv)


# --- the app -------------------------------------------------------------------------------------------------

class App:
    """The loaded model (one at a time) and the runs of the page. Runs take turns (Gradio's queue), so the
    model is only ever used by one."""

    def __init__(self, checkpoint=str(DEFAULT_CHECKPOINT), device="cpu", dtype="float32"):
        self.parser = build_parser()
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype
        self.pipe, self.loaded = None, None
        self.stop = {}                      # session -> its Stop button was pressed
        self.files = Path(tempfile.mkdtemp(prefix="minisd-app-"))
        self.model(checkpoint)

    def parse(self, argv):
        try:
            return self.parser.parse_args(argv)
        except SystemExit:   # argparse printed why; the page's fields cannot give such argv
            raise UsageError(f"the command line does not parse: {command(argv)}") from None

    def model(self, checkpoint):
        """The pipeline of `checkpoint`, loaded unless it is the one in memory; if it fails to load, the one
        before comes back, so the page keeps working."""
        args = self.parse(["--prompt", "", "--checkpoint", checkpoint, "--device", self.device, "--dtype", self.dtype])
        key = (args.checkpoint, args.device, args.dtype)
        if key != self.loaded:
            before = self.loaded
            self.pipe, self.loaded = None, None   # the old model goes before the new one comes: memory
            try:
                self.pipe, self.loaded = load_pipeline(args), key
            except BaseException:
                if before:
                    self.model(before[0])
                raise
        return self.pipe

    def defaults(self, checkpoint):
        """What page_argv leaves out: the command line's defaults, and the model's steps and guidance."""
        cfg = self.model(checkpoint).cfg
        return {"checkpoint": checkpoint, "device": self.device, "dtype": self.dtype, "steps": cfg.default_steps,
                "guidance": cfg.default_guidance, "parser": {f"--{k}": self.parser.get_default(k)
                                                             for k in ("checkpoint", "device", "dtype")}}

    def run_argv(self, argv, callback=None, with_plain=True, log=None):
        """One command line, as minisd.sample runs it, without writing files: (Output, the job)."""
        args = self.parse(argv)
        checked = argparse.Namespace(**vars(args))
        if checked.save_attention:   # the page writes no grid: check a folder it may write in instead
            checked.save_attention = str(self.files)
        check_args(checked)
        job = prepare(args, self.model(args.checkpoint), log=log or (lambda *a: None))
        return generate(job, 0, callback=callback, with_plain=with_plain), job


def loss_frames(out):
    """The method's loss, as frames for two plots: Attention Regulation's optimiser's first and best loss per step,
    a line per layer; Attend-and-Excite's and SynGen's loss per step (and its parts) in the first, None in the
    second. (None, None) for a method without a loss."""
    import pandas as pd
    from .blocks import block_of
    if out.run is None or not out.run.hooks:
        return None, None
    hook, columns = out.run.hooks[0], ["step", "loss", "series"]
    one = lambda v: v[0] if isinstance(v, (list, tuple)) else v   # one image: its own loss
    if hasattr(hook, "loss_table"):
        table = hook.loss_table().items()
        first = [(s, one(a), block_of(name)) for name, steps in table for s, (a, _) in steps.items()]
        best = [(s, one(b), block_of(name)) for name, steps in table for s, (_, b) in steps.items()]
        return pd.DataFrame(first, columns=columns), pd.DataFrame(best, columns=columns)
    if out.run.method == "attend-excite":
        rows = [(s, one(r["loss_before"]), "loss") for s, r in hook.history.items()]
        rows += [(s, one(r["loss_refined"]), "after refinement") for s, r in hook.history.items() if r["loss_refined"]]
    elif out.run.method == "syngen":
        rows = [(s, one(r[k]), k) for s, r in hook.history.items() for k in ("loss", "positive", "negative")]
    else:
        return None, None
    return (pd.DataFrame(rows, columns=columns) if rows else None), None


def map_view(shown, step, alone):
    """The maps at the kept step nearest to `step`: the command line's grid (minisd/maps.py) for that one step,
    plain then the method, each word's map over the run's image or alone."""
    import torch
    panels = []
    for title, image, maps in shown["panels"]:
        s = min(maps, key=lambda k: abs(k - step))
        panels.append((title, Image.fromarray(image), {s: torch.from_numpy(maps[s])}))
    return grid(panels, shown["words"], cell=CELL, over=not alone), s


def build(app):
    """The page."""
    import gradio as gr

    def targets_field(prompt, method):
        return (gr.update(value=default_targets(app.pipe.tokenizer, method, prompt), label=targets_label(method)),
                gr.update(visible=method != "plain" and "weights" in METHODS[method].takes),
                gr.update(visible=method == "regulate"))

    def run(prompt, seed, steps, guidance, method, targets, weights, compiled, checkpoint, view,
            progress=gr.Progress(), request: gr.Request = None):
        session = request.session_hash if request else None
        app.stop[session] = False
        fields = dict(prompt=prompt, seed=seed, steps=steps, guidance=guidance, method=method, targets=targets,
                      weights=weights, compile=compiled)
        lines, started, done = [], time.perf_counter(), [0]
        try:
            defaults = app.defaults(checkpoint.strip() or app.checkpoint)
            argv, plain_argv = page_argv(fields, app.pipe.tokenizer, defaults)
            total = int(steps or defaults["steps"]) * (1 if method == "plain" else 2)

            def step(info):
                if app.stop.get(session):
                    raise Stopped(f"stopped at step {info['i'] + 1}")
                done[0] += 1
                plain = method == "plain" or done[0] > total // 2   # the method runs first, then plain
                progress((done[0], total), desc="plain" if plain else title(method))
            out, job = app.run_argv(argv, callback=step, log=lines.append)
        except Stopped as e:
            return error_outputs(f"{e}; nothing was kept", error=False)
        except (UsageError, CheckpointError, NonFiniteError, ValueError, OSError, MemoryError) as e:
            return error_outputs(f"error: {page_words(one_line(e, argparse.Namespace(checkpoint=checkpoint)), method)}")
        except Exception as e:   # a bug: its traceback goes to the server's console, the page gets one line
            traceback.print_exc()
            return error_outputs(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        seconds = time.perf_counter() - started
        return result_outputs(out, job, argv, plain_command(plain_argv, job), lines, seconds, view == "alone")

    def said(line, error=True):
        # HTML, not Markdown: a message's underscores and asterisks (file names, layer names) stay as they are
        return f'<span class="{"minisd-error" if error else ""}">{html.escape(line)}</span>'

    def write(image, settings, job, name):
        folder = app.files / f"{time.time_ns()}"
        path = folder / name
        save_image(image, path, parameters_text(job.args.prompt, job.args.negative_prompt, settings), [])
        return str(path)

    def result_outputs(out, job, argv, plain_argv, lines, seconds, alone):
        method = job.method or "plain"
        plain_png = write(out.plain, settings(job, out.seed), job, f"minisd-plain-{out.seed}.png")
        method_png = write(out.image, out.settings, job, f"minisd-{method}-{out.seed}.png") if job.method else None
        shown = {"words": [w for w, _ in job.groups],
                 "panels": [(t, np.asarray(im), {s: m.numpy() for s, m in maps.items()}) for t, im, maps in out.panels]}
        last = job.show_steps[-1]
        cmds = [f"# {title(method)}\n{command(argv)}"] + ([f"# plain\n{command(plain_argv)}"] if plain_argv else [])
        first, best = loss_frames(out)
        regulation = job.method == "regulate"
        status = (f"plain{' and ' + title(method) if job.method else ''} in {seconds:.1f} s "
                  f"(seed {out.seed}, {job.steps} steps)")
        return (np.asarray(out.plain),
                gr.update(value=np.asarray(out.image) if job.method else None, label=title(method)), "\n".join(cmds),
                gr.update(value=plain_png, visible=True), gr.update(value=method_png, visible=bool(method_png)),
                shown if out.panels else None,
                gr.update(maximum=job.steps - 1, value=last, visible=bool(out.panels)),
                *maps_update(shown if out.panels else None, last, alone,
                             f"no maps: {title(method)} {METHODS[method].maps_absent}" if job.method and
                             METHODS[method].maps_absent else "no maps: the prompt has no target words"),
                gr.update(value=first, visible=first is not None,
                          label="the optimiser's first loss, per layer" if regulation else f"{title(method)}'s loss"),
                gr.update(value=best, visible=best is not None), "\n".join(lines), said(status, error=False))

    def error_outputs(line, error=True):
        hidden = gr.update(value=None, visible=False)
        return (None, None, "", hidden, hidden, None, gr.update(), hidden, "", hidden, hidden, "", said(line, error))

    def stop(request: gr.Request = None):
        app.stop[request.session_hash if request else None] = True

    def maps_update(shown, step, alone, none=""):
        if not shown:
            return gr.update(value=None, visible=False), none
        image, s = map_view(shown, step, alone)
        return (gr.update(value=image, visible=True),
                f"**cross-attention maps at step {s}**, in the layers the method acts on (mean over heads and layers)")

    def redraw(shown, step, view):
        return maps_update(shown, step, view == "alone")

    first, _, _ = targets_field(PRESET_PROMPT, "regulate")
    defaults = app.defaults(app.checkpoint)
    with gr.Blocks(title="minisd: see inside the attention", analytics_enabled=False) as demo:
        gr.Markdown("## minisd: see inside the attention\nType a prompt, pick a method, Run: the plain image and "
                    "the method's from the same seed, and the target words' cross-attention maps in the layers "
                    "the method acts on.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(PRESET_PROMPT, label="prompt", elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(PRESET_SEED, label="seed", precision=0, minimum=0, elem_id="seed")
                    steps = gr.Number(defaults["steps"], label="steps", precision=0, minimum=1, elem_id="steps")
                    guidance = gr.Number(defaults["guidance"], label="guidance", minimum=0, elem_id="guidance")
                method = gr.Radio([("plain", "plain")] + [(m.title, name) for name, m in METHODS.items()],
                                  value="regulate", label="method", elem_id="method")
                targets = gr.Textbox(first["value"], label=first["label"], elem_id="targets")
                weights = gr.Textbox("", label="concept weights ('7.5 | 3'; empty: the guidance scale each)",
                                     visible=False, elem_id="weights")
                compiled = gr.Checkbox(False, label="compiled optimiser (--compile-optimizer: torch.compile, faster "
                                       "on a GPU; the first steps pay the compile)", elem_id="compile-optimizer")
                with gr.Row():
                    go = gr.Button("Run", variant="primary", elem_id="run")
                    halt = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.HTML("", elem_id="status")
                tokens = gr.Code(label="targets and their tokens", elem_id="tokens", lines=4)
                with gr.Accordion("model", open=False):
                    checkpoint = gr.Textbox(app.checkpoint, label="checkpoint (.safetensors or a "
                                            "diffusers folder)", elem_id="checkpoint")
                gr.Markdown(RATE)
            with gr.Column(scale=3):
                with gr.Row():
                    plain_image = gr.Image(label="plain", format="png", interactive=False, elem_id="plain-image",
                                           height=300)
                    method_image = gr.Image(label="method", format="png", interactive=False, elem_id="method-image",
                                            height=300)
                commands = gr.Code(label="the command lines that remake these images", language="shell",
                                   lines=4, wrap_lines=True, elem_id="command")
                with gr.Row():
                    plain_png = gr.DownloadButton("plain image (PNG)", visible=False, elem_id="download-plain")
                    method_png = gr.DownloadButton("method's image (PNG)", visible=False, elem_id="download-method")
                with gr.Row():
                    step = gr.Slider(0, defaults["steps"] - 1, step=1, label="step (the nearest step kept)",
                                     visible=False, elem_id="step")
                    view = gr.Radio(["over the image", "alone"], value="over the image", label="maps",
                                    elem_id="view")
                maps_step = gr.Markdown("", elem_id="maps-step")
                maps = gr.Image(format="png", interactive=False, visible=False, show_label=False, elem_id="maps")
                with gr.Row():
                    loss = gr.LinePlot(x="step", y="loss", color="series", label="the method's loss",
                                       visible=False, elem_id="loss")
                    best_loss = gr.LinePlot(x="step", y="loss", color="series", visible=False, elem_id="best-loss",
                                            label="the optimiser's best loss (the one it keeps), per layer")
        shown = gr.State(None)

        # one listener, one at a time: the field ends as the last change asks (prompt and method changed together
        # would otherwise race), and never waits for a run
        gr.on([prompt.change, method.change], targets_field, [prompt, method], [targets, weights, compiled],
              concurrency_limit=1, concurrency_id="fill", trigger_mode="always_last")
        # one run at a time, whichever tab asks: a tab waits for at most the run in progress
        go.click(run, [prompt, seed, steps, guidance, method, targets, weights, compiled, checkpoint, view],
                 [plain_image, method_image, commands, plain_png, method_png, shown, step, maps, maps_step, loss,
                  best_loss, tokens, status], concurrency_limit=1, concurrency_id="run")
        # not Gradio's cancel: the run stops itself at its next step and says so in the page
        halt.click(stop, None, None, concurrency_limit=None)
        for trigger in (step.change, view.change):
            trigger(redraw, [shown, step, view], [maps, maps_step], concurrency_limit=None,
                    trigger_mode="always_last")
    return demo


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minisd.app", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=7860, help="the port to serve on (default 7860)")
    ap.add_argument("--listen", action="store_true",
                    help="serve on every network interface, not only 127.0.0.1: whoever reaches this machine "
                         "can then run the model")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help="the model (default: the shipped one); the page can load another")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = ap.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no calls home: the page is local
    try:
        import gradio as gr
    except ImportError:
        print('error: the app needs Gradio: pip install -e ".[app]"', file=sys.stderr)
        sys.exit(2)
    try:
        app = App(args.checkpoint, args.device, args.dtype)
    except (UsageError, CheckpointError, ValueError, OSError, MemoryError) as e:
        print(f"error: {one_line(e, args)}", file=sys.stderr)
        sys.exit(2)
    # system fonts: the default theme would ask a font server the machine may not reach
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    demo = build(app)
    try:
        demo.queue(default_concurrency_limit=1).launch(
            server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port, theme=theme,
            footer_links=[], show_error=False, css=CSS)
    except OSError as e:
        print(f"error: port {args.port}: {one_line(e, args)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
