"""python -m minisd.sample --prompt "a red circle and a blue square" [--regulate] ...

Generates PNG files whose `parameters` text chunk records every generation setting in the format of AUTOMATIC1111's
web UI, which image browsers and prompt readers understand, so an image can be reproduced from the file alone
(`--out x.jpg` or `x.webp`: that format, the settings in the EXIF UserComment). Whatever can be known to fail is
refused before the model runs, as one `error:` line and exit status 2; Ctrl-C leaves only finished images.
Without --checkpoint it uses the tiny model shipped in weights/ (trained here on a world of coloured shapes).
"""
import argparse
import math
import pickle
import re
import sys
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import DEFAULT_CHECKPOINT, CheckpointError
from .generate import DTYPES, chosen_method, generate, load_pipeline, prepare, warn
from .images import UsageError, read_image, check_writable, output_paths, parameters_text, remove_empty, save_image
from .pipeline import NonFiniteError
from .samplers import SAMPLERS
from regulation.editors import METHODS, and_list   # the command line and the page are where minisd meets regulation
from regulation.registry import flag as option_flag

# --- checks that need only the arguments, or the model's config -----------------------------------------------

def check_device(name):
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this torch cannot use CUDA (a CPU-only build, or no GPU or driver); "
                             f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0..)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS (Apple GPUs) is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: minisd runs on cpu, cuda or mps")
    return device


def check_sd3_args(args):
    """SD 3's flags, before its model (gigabytes) is read: a T5 tokenizer that cannot be read, a length or shift
    that means nothing."""
    if args.t5_length is not None and args.t5_length < 1:
        raise UsageError(f"--t5-length must be at least 1 (T5's end-of-text token), got {args.t5_length}")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise UsageError(f"--shift must be a finite number > 0, got {args.shift}")
    if args.t5_tokenizer:
        from .t5 import T5Tokenizer
        try:
            T5Tokenizer(args.t5_tokenizer)
        except ValueError as e:
            raise UsageError(str(e)) from None


def check_image_args(args):
    """Image-to-image's and skip-layer guidance's flags, as far as they can be judged without the model."""
    if args.init_image:
        read_image(args.init_image, "--init-image")
    if args.denoise is not None:
        if not args.init_image:
            raise UsageError("--denoise is the part of the steps image-to-image runs; add --init-image")
        if not (math.isfinite(args.denoise) and 0 < args.denoise <= 1):
            raise UsageError(f"--denoise is the fraction of the steps that run, in (0, 1]; got {args.denoise}")
    if args.slg_scale is not None and not (math.isfinite(args.slg_scale) and args.slg_scale >= 0):
        raise UsageError(f"--slg-scale must be a finite number >= 0, got {args.slg_scale}")
    for flag in ("slg_start", "slg_end"):
        v = getattr(args, flag)
        if v is not None and not 0 <= v <= 1:
            raise UsageError(f"--{flag.replace('_', '-')} is a fraction of the steps, in [0, 1]; got {v}")


def block_numbers(text):
    """--slg-layers 7,8,9 -> (7, 8, 9)."""
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected joint block numbers such as 7,8,9, got {text!r}") from None


def check_args(args):
    """Everything that can be refused from the arguments alone, before the model is read."""
    if args.n < 1:
        raise UsageError("--n must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name} must be positive, got {v}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise UsageError(f"--guidance must be a finite number >= 0 (1 or less: no classifier-free guidance), "
                         f"got {args.guidance}")
    check_sd3_args(args)
    if args.guidance is not None and args.guidance <= 1 and args.negative_prompt:
        raise UsageError(f"--negative-prompt works through classifier-free guidance, which --guidance "
                         f"{args.guidance} turns off; use a scale above 1 or drop the negative prompt")
    if not 0 <= args.seed <= 2 ** 63 - args.n:   # torch's generators take seeds below 2**64; stay well inside
        raise UsageError(f"--seed must be between 0 and 2**63 - --n, got {args.seed}")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise UsageError(f"--eta must be a finite number >= 0, got {args.eta}")
    if args.decoder == "taesd" and not args.taesd:
        raise UsageError("--decoder taesd needs --taesd PATH (taesd_decoder.safetensors)")
    # options of regulation that would otherwise do nothing
    method = chosen_method(args)
    if method is None:
        if args.edit_steps is not None:
            raise UsageError("--edit-steps applies to --regulate or --method; add one")
        if not args.save_attention:
            for flag in ("targets", "regulate_layers"):
                if getattr(args, flag) is not None:
                    raise UsageError(f"--{flag.replace('_', '-')} applies to --regulate, --method or --save-attention")
    # which method takes which option: the table of methods (regulation/registry.py)
    entry = METHODS[method] if method else None
    takes = entry.takes if entry else frozenset()

    def takers(option):   # "DenseDiffusion", "dense": for the messages that say which method to add
        found = [m for m in METHODS.values() if option in m.takes]
        return and_list([m.title for m in found]), or_list([m.name for m in found])
    if args.layout is not None and "layout" not in takes:
        raise UsageError("--layout gives {} its regions; add --method {}".format(*takers("layout")))
    if args.layout_background is not None and "layout_background" not in takes:
        raise UsageError("--layout-background applies to {}'s layout; add --method {}".format(
            *takers("layout_background")))
    if args.concept_weights is not None and "weights" not in takes:
        raise UsageError("--concept-weights weighs {}'s concepts; add --method {}".format(*takers("weights")))
    if args.strength is not None and "strength" not in takes:
        raise UsageError(f"--strength applies to --method {takers('strength')[1]}; {other_knobs(METHODS)}")
    if args.strength is not None and not math.isfinite(args.strength):
        raise UsageError(f"--strength must be a finite number, got {args.strength}")
    for option in entry.needs if entry else ():
        if not getattr(args, option_flag(option)[2:].replace("-", "_")):
            raise UsageError(f"--method {method} ({entry.title}) needs {NEEDED.get(option, option_flag(option))}")
    if entry and entry.self_attention and args.backend != "eager":
        raise UsageError(f"--method {method} edits self-attention, which --backend {args.backend} keeps inside its "
                         "compiled graph; use --backend eager")
    if entry and entry.maps_absent and args.save_attention:
        raise UsageError(f"--method {method} ({entry.title}) {entry.maps_absent}: it has no maps to show; drop "
                         "--save-attention")
    if args.edit_steps is not None and args.edit_steps < 0:
        raise UsageError(f"--edit-steps must be between 0 and --steps, got {args.edit_steps}")
    if args.compile_optimizer and method != "regulate":
        raise UsageError("--compile-optimizer compiles Attention Regulation's optimiser; add --regulate")
    if args.save_attention:
        folder = Path(args.save_attention)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--save-attention {folder} is a file; it names a folder for the attention grids")
        check_writable(folder, "--save-attention")
    check_image_args(args)
    check_device(args.device)


# what a method that needs an option is told
NEEDED = {"layout": 'a layout: --layout "circle:0.1,0.1,0.5,0.5;square:0.5,0.5,0.9,0.9" (phrase:box as fractions '
                    'x0,y0,x1,y1) or "circle=mask.png;..."'}


def or_list(words):
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else "".join(words)


def other_knobs(methods):
    """"Attention Regulation's knob is --edit-steps": the methods whose knob is not --strength."""
    return "; ".join(f"{m.title}'s knob is --{m.knob.option.replace('_', '-')}" for m in methods.values()
                     if m.knob.option != "strength")


def strength_help(methods):
    """--strength's help, from each method's knob: methods with the same knob and default said together."""
    said = []
    for m in methods.values():
        if m.knob.option == "strength":
            what = f"{m.knob.help} ({'the guidance' if m.knob.default is None else f'{m.knob.default:g}'})"
            if said and said[-1][1] == what:
                said[-1][0].append(m.name)
            else:
                said.append(([m.name], what))
    return ("the method's one strength knob (its authors' default otherwise): "
            + "; ".join(f"{and_list(names)}, {what}" for names, what in said) + ". " + other_knobs(methods))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where the help does not already say it, and never "(default: None)"."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "" \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m minisd.sample", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--prompt", required=True, help="what to draw")
    ap.add_argument("--negative-prompt", default="",
                    help="what to steer away from (classifier-free guidance; SDXL: empty means zero embeddings, "
                         "as in diffusers)")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help="single-file .safetensors (SD 1.x/2.x, SDXL base or minisd) or a diffusers folder "
                         "(default: the shipped model, weights/minisd-shapes.safetensors)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's; SD: 50)")
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale, finite and >= 0; 1 or less turns guidance off "
                         "(default: the model's; SD: 7.5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of image 1; image i uses seed + i - 1")
    ap.add_argument("--height", type=int, default=None,
                    help="pixels, a multiple of the model's size unit: the VAE's factor x 2^(UNet levels - 1), "
                         "64 for SD, 32 for the shipped model (default: the model's size; SDXL: 1024, with its "
                         "micro-conditioning original = target = this size, crop 0,0)")
    ap.add_argument("--width", type=int, default=None, help="pixels, as --height (default: the model's size)")
    ap.add_argument("--n", type=int, default=1, help="number of images")
    ap.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                    help="sampler (default: the model's; SD: dpmpp_2m; SD 3: dpmpp_2m, or euler for SD 3.5 Large "
                         "Turbo, docs/sd3.md)")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
    ap.add_argument("--spacing", default="leading", choices=["leading", "trailing", "linspace"],
                    help="timestep spacing")
    ap.add_argument("--prediction", default=None, choices=["epsilon", "v"],
                    help="override the model's prediction type (default: from the checkpoint)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES),
                    help="model dtype (with float16, SDXL's VAE stays float32: it overflows in float16)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    ap.add_argument("--backend", default="eager", choices=["eager", "inductor", "openvino"],
                    help="run the UNet compiled (minisd/fast.py; hooks keep working); the first step pays the compile")
    ap.add_argument("--out", default="outputs",
                    help="a folder for numbered PNGs, or one image file: .png, .jpg/.jpeg or .webp")
    ap.add_argument("--overwrite", action="store_true", help="allow --out FILE to replace an existing file")
    ap.add_argument("--decoder", default="vae", choices=["vae", "taesd"], help="latents -> pixels")
    ap.add_argument("--taesd", default=None,
                    help="TAESD decoder weights (taesd_decoder.safetensors) for --decoder taesd")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="allow a pickle .ckpt checkpoint (loaded with torch.load(weights_only=True))")
    g = ap.add_argument_group("SD 3 / 3.5 (single files hold the MMDiT and the VAE; the text encoders are files of "
                              "their own)")
    g.add_argument("--clip-l", default=None, help="CLIP-L text encoder, clip_l.safetensors")
    g.add_argument("--clip-g", default=None, help="OpenCLIP bigG text encoder, clip_g.safetensors")
    g.add_argument("--t5", default=None, help="T5-XXL text encoder, t5xxl_fp16.safetensors (without it: zeros in "
                                              "its place, as diffusers allows)")
    g.add_argument("--t5-tokenizer", default=None,
                   help="T5's SentencePiece model, spiece.model (default: tokenizer_3/spiece.model beside the "
                        "checkpoint)")
    g.add_argument("--t5-length", type=int, default=None,
                   help="pad (and cut) T5's tokens to this length; default: Stability's reference, at least 77 "
                        "and never cut, the prompt's first 226 characters (diffusers' pipeline: 256)")
    g.add_argument("--shift", type=float, default=None,
                   help="the rectified flow's shift, > 0 (default: the file's, docs/sd3.md; SD 3 and 3.5: 3.0)")
    g = ap.add_argument_group("SD 3.5 skip-layer guidance (Stability's reference; off by default)")
    g.add_argument("--slg-medium", action="store_true",
                   help="the reference's SD 3.5 Medium setting: layers 7,8,9, scale 2.5, from 1%% to 20%% of the "
                        "steps, guidance 4 (unless --guidance); the --slg-* flags below change parts of it")
    g.add_argument("--slg-scale", type=float, default=None,
                   help="its scale: the guided prediction moves away from the pass without --slg-layers by this "
                        "times (conditional - skipped); default 2.5 once any --slg-* flag is given")
    g.add_argument("--slg-layers", type=block_numbers, default=None,
                   help="the joint blocks the extra pass leaves out, e.g. 7,8,9 (the default)")
    g.add_argument("--slg-start", type=float, default=None,
                   help="the fraction of --steps after which it starts (default 0.01: steps i > 0.01 x steps)")
    g.add_argument("--slg-end", type=float, default=None,
                   help="the fraction of --steps before which it stops (default 0.2: steps i < 0.2 x steps)")
    g = ap.add_argument_group("image-to-image (every family)")
    g.add_argument("--init-image", default=None, metavar="PATH",
                   help="start from this image (its size is the output's: a multiple of the model's size unit)")
    g.add_argument("--denoise", type=float, default=None,
                   help="the fraction of --steps that runs from the noised image, in (0, 1] (default 0.8, as "
                        "Stability's reference and diffusers' SD img2img); at 1, SD's first level still holds a "
                        "trace of the image, SD 3's is pure noise")
    g = ap.add_argument_group("attention regulation (Zhang et al., ECCV 2024) and the paper's other methods")
    g.add_argument("--regulate", action="store_true", help="regulate the cross-attention of the target words "
                   "(the same as --method regulate)")
    g.add_argument("--method", default=None, choices=list(METHODS),
                   help="; ".join(f"{name}: {m.about or m.title}" for name, m in METHODS.items()))
    g.add_argument("--targets", default=None,
                   help='target words, e.g. "cat dog" or "dog#2" for the second dog; syngen: its pairs, "red circle; '
                        'blue square"; composable: its concepts, "a red circle | a blue square" (default: the nouns '
                        "of the prompt within its first 77 tokens; syngen: pairs parsed by rules; composable: the "
                        "prompt split at 'and' and commas)")
    g.add_argument("--layout", default=None,
                   help='--method dense: a region per phrase, "circle:0.1,0.1,0.5,0.5;square:0.5,0.5,0.9,0.9" '
                        '(boxes as fractions x0,y0,x1,y1 of the image) or "red circle=mask1.png;blue square=mask2.png" '
                        '(white = inside)')
    g.add_argument("--layout-background", default=None, choices=["region", "none"],
                   help="--method dense: the pixels no phrase covers form a background region with no tokens "
                        "(region, the authors' demo; the default) or belong to no region (none)")
    g.add_argument("--strength", type=float, default=None,
                   help=strength_help(METHODS))
    g.add_argument("--concept-weights", default=None,
                   help='--method composable: one weight per concept, the authors\' syntax "7.5 | -5" (a negative '
                        "weight pushes away from its concept; missing weights are the guidance scale)")
    g.add_argument("--regulate-layers", default=None,
                   help="layers: checkpoint names (input_blocks.7), diffusers names (down_blocks.2) or map sizes "
                        "(16x16); also the layers --save-attention shows (default: the deepest level of "
                        "the down and up paths with cross-attention; SD: the 1/32-side layers)")
    g.add_argument("--edit-steps", type=int, default=None,
                   help="regulate the first N of the --steps steps, 0..steps (default: half of --steps; "
                        "Attend-and-Excite: 25, at most --steps)")
    g.add_argument("--save-attention", default=None, metavar="DIR",
                   help="write a PNG grid of each target word's cross-attention map per image, in the regulated "
                        "layers (with --regulate: plain and regulated side by side)")
    g.add_argument("--compile-optimizer", action="store_true",
                   help="run Attention Regulation's optimiser as one torch.compile graph (a CUDA graph on a GPU), "
                        "equal to the eager loop; the first regulated step of each map size pays the compile "
                        "(docs/speed.md)")
    return ap


def run(args, log=print):
    """Generate and write the images of `args`; folders this run made and left empty are removed on any error."""
    made = []
    with warnings.catch_warnings():
        try:
            return _run(args, log, made)
        except BaseException:
            remove_empty(made)
            raise


def _run(args, log, made):
    from .maps import grid

    check_args(args)
    seeds = [args.seed + i for i in range(args.n)]
    paths = output_paths(args.out, args.n, seeds, args.overwrite)
    grid_dir = Path(args.save_attention) if args.save_attention else None
    if grid_dir:
        for path in paths:
            g = grid_dir / f"{path.stem}-attention.png"
            if g.exists() and not args.overwrite:
                raise UsageError(f"{g} exists; choose another --save-attention folder or pass --overwrite")
    job = prepare(args, load_pipeline(args), log=log)

    passes = 2 if job.method and args.save_attention else 1   # --save-attention adds a plain run beside
    bar = tqdm(total=args.n * (job.steps - job.start) * passes, desc="sampling", disable=not sys.stderr.isatty())
    try:
        for i, path in enumerate(paths):
            out = generate(job, i, callback=lambda info: bar.update(1))
            save_image(out.image, path, parameters_text(args.prompt, args.negative_prompt, out.settings), made)
            log(f"wrote {path}")
            if grid_dir:
                gpath = grid_dir / f"{path.stem}-attention.png"
                about = {**out.settings, "Attention steps": " ".join(map(str, job.show_steps)),
                         "Attention layers": " ".join(sorted(out.layers_seen)),
                         "Attention maps": "mean over heads and layers; each map scaled to its own min..max"}
                save_image(grid(out.panels, [w for w, _ in job.groups]),
                           gpath, parameters_text(args.prompt, args.negative_prompt, about), made)
                log(f"wrote {gpath}")
    finally:
        bar.close()
    return paths


def one_line(e, args):
    """The message of an error, made fit for one line where it comes from elsewhere (torch, the OS)."""
    if isinstance(e, CheckpointError) and isinstance(e.__context__, pickle.UnpicklingError):
        m = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(e.__context__))
        what = f"it asks to call {m.group(1)} when loaded" if m else "it holds more than tensors and plain containers"
        return (f"{args.checkpoint} is refused even with --allow-pickle: {what}; a weights-only load never runs "
                f"that. Do not load it with plain torch.load unless you trust where it comes from")
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e):
        return f"out of memory ({str(e).splitlines()[0] if str(e) else 'MemoryError'}); use a smaller size or dtype"
    return str(e)


def main(argv=None):
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        # any other warning (numpy's, torch's) as one line, not a file path and a source line
        warnings.showwarning = lambda message, category, *rest, **kw: warn(str(message).splitlines()[0])
        try:
            run(args)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except (UsageError, CheckpointError, NonFiniteError, ValueError, OSError, MemoryError,
                torch.OutOfMemoryError) as e:
            print(f"error: {one_line(e, args)}", file=sys.stderr)
            sys.exit(2)
        except RuntimeError as e:
            if "can't allocate memory" not in str(e):
                raise
            print(f"error: {one_line(e, args)}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
