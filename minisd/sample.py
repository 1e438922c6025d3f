"""python -m minisd.sample --prompt "a red circle and a blue square" [--regulate] ...

Generates PNG files whose `parameters` text chunk records every generation setting in the format of AUTOMATIC1111's
web UI, which image browsers and prompt readers understand, so an image can be reproduced from the file alone.
Without --checkpoint it uses the tiny model shipped in weights/ (trained here on a world of coloured shapes).
"""
import argparse
import hashlib
import re
import sys
import warnings
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import CheckpointError
from .samplers import SAMPLERS

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "minisd-shapes.safetensors"
SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "euler": "Euler", "plms": "PLMS"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    pass


def file_hash(path):
    """AUTOMATIC1111's model hash: the first 10 hex digits of the file's sha256 (of all files, for a folder)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:10]


def parameters_text(prompt, negative, settings):
    """The `parameters` chunk: prompt, negative prompt, then `Key: value` pairs on one line."""
    def value(v):
        v = str(v)
        return f'"{v}"' if re.search(r"[,:\"]", v) else v
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {value(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def output_paths(out, count, seeds, overwrite):
    """A folder gets numbered files after the highest number already there, so nothing is ever replaced; a
    `.png` path is taken as given and refused if it exists (unless --overwrite)."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        if count != 1:
            raise UsageError(f"--out {out} names one file but {count} images were asked for; give a folder")
        if out.exists() and not overwrite:
            raise UsageError(f"{out} exists; choose another path or pass --overwrite")
        out.parent.mkdir(parents=True, exist_ok=True)
        return [out]
    out.mkdir(parents=True, exist_ok=True)
    used = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    start = max(used, default=-1) + 1
    return [out / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def first_image(maps):
    return {s: m[0] for s, m in maps.items()}


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m minisd.sample", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--prompt", required=True, help="what to draw")
    ap.add_argument("--negative-prompt", default="", help="what to steer away from (classifier-free guidance)")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help="single-file .safetensors (SD 1.x/2.x or minisd) or a diffusers folder")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 50)")
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of image 1; image i uses seed + i - 1")
    ap.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    ap.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    ap.add_argument("--n", type=int, default=1, help="number of images")
    ap.add_argument("--sampler", default="dpmpp_2m", choices=list(SAMPLERS), help="sampler")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
    ap.add_argument("--spacing", default="leading", choices=["leading", "trailing", "linspace"], help="timestep spacing")
    ap.add_argument("--prediction", default=None, choices=["epsilon", "v"], help="override the model's prediction type")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model dtype")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    ap.add_argument("--out", default="outputs", help="folder for numbered PNGs, or one .png path")
    ap.add_argument("--overwrite", action="store_true", help="allow --out FILE.png to replace an existing file")
    ap.add_argument("--decoder", default="vae", choices=["vae", "taesd"], help="latents -> pixels")
    ap.add_argument("--taesd", default=None, help="TAESD decoder weights (taesd_decoder.safetensors) for --decoder taesd")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="allow a pickle .ckpt checkpoint (loaded with torch.load(weights_only=True))")
    g = ap.add_argument_group("attention regulation (Zhang et al., ECCV 2024)")
    g.add_argument("--regulate", action="store_true", help="regulate the cross-attention of the target words")
    g.add_argument("--method", default="regulate", choices=["regulate", "attend-excite"],
                   help="with --regulate: Attention Regulation, or Attend-and-Excite (Chefer et al. 2023) for comparison")
    g.add_argument("--targets", default=None,
                   help='target words, e.g. "cat dog" or "dog#2" for the second dog (default: the nouns of the prompt)')
    g.add_argument("--regulate-layers", default=None,
                   help="layers: checkpoint names (input_blocks.7), diffusers names (down_blocks.2) or map sizes (16x16); "
                        "default: the model's (SD: the 1/32-side layers)")
    g.add_argument("--edit-steps", type=int, default=None, help="regulate the first N steps (default: half of --steps)")
    g.add_argument("--save-attention", default=None, metavar="DIR",
                   help="write a PNG grid of each target word's cross-attention map per image (with --regulate: "
                        "plain and regulated side by side)")
    return ap


def run(args, log=print):
    from .pipeline import Pipeline
    from .maps import AttentionMaps, grid, word_maps

    if args.n < 1:
        raise UsageError("--n must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise UsageError(f"--{name} must be a positive multiple of 8, got {v}")
    if args.decoder == "taesd" and not args.taesd:
        raise UsageError("--decoder taesd needs --taesd PATH (taesd_decoder.safetensors)")
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        hint = " (the shipped model is missing: train it with python -m tools.train)" if ckpt == DEFAULT_CHECKPOINT else ""
        raise UsageError(f"checkpoint not found: {ckpt}{hint}")
    pipe = Pipeline.from_checkpoint(ckpt, device=args.device, dtype=DTYPES[args.dtype],
                                    allow_pickle=args.allow_pickle, prediction=args.prediction)
    if args.decoder == "taesd":
        from .taesd import load_taesd_decoder
        taesd = load_taesd_decoder(args.taesd, device=args.device, dtype=DTYPES[args.dtype])
        pipe.decoder = taesd.decode
    steps = args.steps or pipe.cfg.default_steps
    guidance = pipe.cfg.default_guidance if args.guidance is None else args.guidance
    size = (args.height or pipe.cfg.image_size, args.width or pipe.cfg.image_size)
    seeds = [args.seed + i for i in range(args.n)]
    paths = output_paths(args.out, args.n, seeds, args.overwrite)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.tokenizer([args.prompt, args.negative_prompt])
    for w in caught:
        log(f"warning: {w.message}")

    targets = None
    if args.regulate or args.save_attention:
        from regulation.editors import choose_targets, make_editor
        targets = choose_targets(pipe.tokenizer, args.prompt, args.targets.split() if args.targets else None, log=log)
        # built before sampling, so that a bad --regulate-layers is an error before any work
        editors = [make_editor(args.method, pipe, args.prompt, targets, steps, seed=seed, layers=args.regulate_layers,
                               edit_steps=args.edit_steps) for seed in seeds] if args.regulate else []
    settings_extra = {}
    if args.regulate:
        e = editors[0]
        settings_extra = {"Regulation": "Attention Regulation" if args.method == "regulate" else "Attend-and-Excite",
                          "Regulation targets": " ".join(t.word for t in targets),
                          "Regulation layers": " ".join(e.select.specs) if hasattr(e.select, "specs") else None,
                          "Regulation edit steps": getattr(e, "edit_steps", None)}
    model_hash = file_hash(ckpt)
    positions = [p for t in targets for p in t.positions] if targets else []
    groups, k = [], 0
    for t in targets or []:
        groups.append((t.word, list(range(k, k + len(t.positions)))))
        k += len(t.positions)
    show_steps = sorted({0, steps // 4, steps // 2, steps - 1})

    def observer():
        return AttentionMaps(positions, show_steps, pipe.cfg.default_blocks()) if args.save_attention else None

    bar = tqdm(total=args.n * steps, desc="sampling", disable=not sys.stderr.isatty())
    for i, (seed, path) in enumerate(zip(seeds, paths)):
        runs = []
        def generate(hooks):
            return pipe(args.prompt, negative_prompt=args.negative_prompt, steps=steps, guidance=guidance, seed=seed,
                        height=size[0], width=size[1], sampler=args.sampler, spacing=args.spacing, hooks=hooks,
                        callback=lambda info: bar.update(1), **({"eta": args.eta} if args.sampler == "ddim" else {}))
        if args.regulate:
            maps = observer()
            result = generate([editors[i]] + ([maps] if maps else []))
            if maps:
                runs.append(("regulated", result.images[0], first_image(word_maps(maps.result(), groups))))
        if args.save_attention or not args.regulate:
            maps = observer()
            plain = generate([maps] if maps else [])
            if maps:
                runs.insert(0, ("plain", plain.images[0], first_image(word_maps(maps.result(), groups))))
            if not args.regulate:
                result = plain
        image = result.images[0]
        settings = {"Steps": steps, "Sampler": SAMPLER_NAMES.get(args.sampler, args.sampler),
                    "Schedule type": args.spacing, "CFG scale": guidance, "Seed": seed, "Size": f"{size[1]}x{size[0]}",
                    "Model hash": model_hash, "Model": ckpt.stem, "Eta": args.eta if args.sampler == "ddim" else None,
                    "Prediction": pipe.cfg.prediction, "Dtype": args.dtype, "Decoder": args.decoder,
                    **settings_extra, "Version": f"minisd {__version__}"}
        info = PngInfo()
        info.add_text("parameters", parameters_text(args.prompt, args.negative_prompt, settings))
        image.save(path, pnginfo=info)
        log(f"wrote {path}")
        if args.save_attention:
            out = Path(args.save_attention)
            out.mkdir(parents=True, exist_ok=True)
            gpath = out / f"{path.stem}-attention.png"
            grid(image, runs, [w for w, _ in groups]).save(gpath)
            log(f"wrote {gpath}")
    bar.close()
    return paths


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
