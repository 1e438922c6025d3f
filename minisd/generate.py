"""One request of the command line, from its parsed arguments to images: the model loaded, the method set up, then
per seed the method's image and the plain one beside it, the maps of the words the method acts on, and the
settings written beside each image. The command line (minisd/sample.py) writes what this gives to files; the app
(minisd/app.py) shows it in a page. Both therefore run the same code, so a page's image is the command's image.

    args = build_parser().parse_args(argv); check_args(args)
    job = prepare(args, load_pipeline(args))
    out = generate(job, 0)      # out.image, out.settings, out.panels (plain and method, with their maps)
"""
import functools
import re
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import __version__
from .checkpoint import DEFAULT_CHECKPOINT, file_hash
from .config import sd3_preset
from .images import UsageError, read_image
from .pipeline import size_unit
from .tokenizer import PromptTruncatedWarning

SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "euler": "Euler", "plms": "PLMS"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def chosen_method(args):
    """--method, or regulate for --regulate alone; None for a plain run."""
    return args.method or ("regulate" if args.regulate else None)


def attention_steps(steps):
    """The steps whose maps --save-attention keeps (and the app shows). Observing a layer takes it off the SDPA
    path, which rounds differently, so the app keeps exactly these too: its images are then the command's."""
    return sorted({0, steps // 4, steps // 2, steps - 1})


def load_pipeline(args):
    """The pipeline of the checkpoint's model kind: SD3Pipeline for SD 3, else Pipeline."""
    from .loading import load_model
    from .pipeline import Pipeline
    from .pipeline_sd3 import SD3Pipeline
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        hint = (" (the shipped model is missing: train it with python -m tools.testbed.train)"
                if ckpt == DEFAULT_CHECKPOINT else "")
        raise UsageError(f"checkpoint not found: {ckpt}{hint}")
    text_files = {k: getattr(args, a, None) for k, a in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5"))}
    model = load_model(ckpt, device=args.device, dtype=DTYPES[args.dtype], allow_pickle=args.allow_pickle,
                       prediction=args.prediction, text_files=text_files)
    kind = SD3Pipeline if model.cfg.is_sd3 else Pipeline
    return kind.from_model(model, ckpt, getattr(args, "t5_tokenizer", None), getattr(args, "t5_length", None))


@functools.lru_cache(maxsize=8)
def _hash(path, mtime, size):
    return file_hash(path)


def model_hash(path):
    """file_hash, read once per file version: the app asks for it at every run, and SD's files are gigabytes."""
    st = Path(path).stat()
    return _hash(str(path), st.st_mtime_ns, st.st_size)


def map_sizes(cfg, height, width):
    """{block with cross-attention: (h, w) of its maps} for an image of height x width."""
    from .blocks import attention_blocks
    f = cfg.vae.downsample
    return {b: (height // f // 2 ** d, width // f // 2 ** d) for b, d in attention_blocks(cfg.unet).items()}


def check_layer_sizes(specs, cfg, height, width):
    """Layer names are checked by regulation.layers; a map size can only be checked against the image size."""
    sizes = map_sizes(cfg, height, width)
    for spec in str(specs).replace(",", " ").split():
        m = re.fullmatch(r"(\d+)(?:x(\d+))?", spec)
        if m and (int(m.group(1)), int(m.group(2) or m.group(1))) not in sizes.values():
            have = {}
            for block, hw in sizes.items():
                have.setdefault(hw, []).append(block)
            listed = "; ".join(f"{h}x{w} ({', '.join(b)})" for (h, w), b in have.items())
            raise UsageError(f"--regulate-layers {spec}: this model has no cross-attention maps of that size at "
                             f"{width}x{height} px; it has {listed}")


def available_memory(device):
    """Bytes this machine can still give (Linux's MemAvailable, or the GPU's free memory); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_memory(cfg, height, width, dtype, batch):
    """Rough peak bytes of activations (the weights are already loaded): the larger of one UNet call on `batch`
    rows (the skip connections it keeps, a few tensors of its widest level, the feed-forward of its first
    transformer; its self-attention runs blockwise) and the VAE decoding one image (a few tensors of its widest
    level, where each upsampling doubles the side before the channels shrink, plus its one attention over the
    whole latent, whose scores are materialised: it grows with the square of the pixels)."""
    size = torch.finfo(dtype).bits // 8
    u, v = cfg.unet, cfg.vae
    hw = (height // v.downsample) * (width // v.downsample)
    conv = max(v.ch * m * height * width // 4 ** max(d - 1, 0) for d, m in enumerate(v.ch_mult))
    vae = size * (4 * conv + 2 * hw * hw)
    if cfg.is_sd3:  # SD 3: a joint block's tensors over image and text tokens, and one observed block's scores
        m = cfg.mmdit
        tokens = hw // m.patch_size ** 2 + 154
        return max(vae, batch * size * (16 * tokens * m.hidden_size + m.num_heads * tokens * tokens))
    skips = sum((u.num_res_blocks + 1) * u.model_channels * m * hw // 4 ** d for d, m in enumerate(u.channel_mult))
    widest = u.model_channels * u.channel_mult[0] * hw
    ff = 12 * widest if 1 in u.attention_resolutions else 0
    unet = batch * size * (skips + 4 * widest + ff)
    return max(unet, vae)


def check_cost(cfg, height, width, dtype, batch, device):
    """Refuse a size whose activations cannot fit in what the machine has; warn about one far above the model's
    own size (time grows at least with the pixels, and attention with their square)."""
    need, have = estimate_memory(cfg, height, width, dtype, batch), available_memory(device)
    gib = 2 ** 30
    if have is not None and need > have:
        raise UsageError(f"{width}x{height} needs about {need / gib:.1f} GiB for activations and {device.type} has "
                         f"{have / gib:.1f} GiB available; choose a smaller size (this model's own is "
                         f"{cfg.image_size}x{cfg.image_size})")
    ratio = height * width / cfg.image_size ** 2
    if ratio > 4:
        warn(f"{width}x{height} is {ratio:.0f}x the pixels of this model's {cfg.image_size}x{cfg.image_size}: "
             f"expect more than {ratio:.0f}x the time per step (attention grows with the square), about "
             f"{need / gib:.1f} GiB of activations, and a model that was not trained at that size")
    elif have is not None and need > have / 2:
        warn(f"{width}x{height} needs about {need / gib:.1f} GiB of the {have / gib:.1f} GiB available")


def init_image(args, cfg, unit):
    """--init-image read and checked against the model's size unit and --height/--width (the run keeps the
    image's size); None without it."""
    if not getattr(args, "init_image", None):
        return None
    image = read_image(args.init_image, "--init-image")
    w, h = image.size
    if (args.height or h, args.width or w) != (h, w):
        raise UsageError(f"--init-image {args.init_image} is {w}x{h} px and image-to-image keeps its size; drop "
                         f"--height/--width or resize the image to {args.width or w}x{args.height or h}")
    if h % unit or w % unit:
        raise UsageError(f"--init-image {args.init_image} is {w}x{h} px; this model's sides are multiples of {unit} "
                         f"(its size unit): crop or resize it, e.g. to {max(unit, w // unit * unit)}x"
                         f"{max(unit, h // unit * unit)}")
    return image


def skip_layer_guidance(args, cfg, guidance):
    """--slg-*: (a pipeline_sd3.SkipLayerGuidance or None, the guidance: --slg-medium's 4 unless --guidance)."""
    given = {k: getattr(args, f"slg_{k}", None) for k in ("scale", "layers", "start", "end")}
    given = {k: v for k, v in given.items() if v is not None}
    medium = getattr(args, "slg_medium", False)
    if not given and not medium:
        return None, guidance
    if not cfg.is_sd3:
        raise UsageError(f"--slg-* is skip-layer guidance over SD 3's joint blocks; {cfg.name} has a UNet")
    from .pipeline_sd3 import SLG_MEDIUM, SLG_MEDIUM_GUIDANCE
    slg = replace(SLG_MEDIUM, **given)
    try:
        slg.check(cfg.mmdit.depth)
    except ValueError as e:
        raise UsageError(f"--slg-*: {e}") from None
    return slg, SLG_MEDIUM_GUIDANCE if medium and args.guidance is None else guidance


@dataclass
class Job:
    """A request checked against the model and set up: what generate() needs for each seed."""
    args: object
    pipe: object
    seeds: list
    size: tuple
    steps: int
    guidance: float
    method: str = None
    runs: list = field(default_factory=list)   # one regulation.editors.Run per seed
    select: object = None                      # the layers whose maps are shown
    groups: list = field(default_factory=list)  # [(word, [indices into positions])]
    positions: list = field(default_factory=list)
    show_steps: list = field(default_factory=list)
    model_hash: str = ""
    start: int = 0                             # image-to-image: the first step that runs
    pipe_options: dict = field(default_factory=dict)   # image-to-image's and skip-layer guidance's arguments
    image_settings: dict = field(default_factory=dict)  # and what they write beside the image
    sampler: str = None                        # --sampler, else the model's default
    shift: float = None                        # SD 3's rectified-flow shift (None for SD 1/2/XL)


def prepare(args, pipe, log=print):
    """Everything that can be refused once the model is known, then the method's hooks, one set per seed."""
    cfg = pipe.cfg
    unit = size_unit(cfg)
    image = init_image(args, cfg, unit)   # image-to-image: the image's size is the run's
    size = (image.height, image.width) if image else (args.height or cfg.image_size, args.width or cfg.image_size)
    for name, v in zip(("height", "width"), size):
        if v % unit:
            why = f"patch size {cfg.mmdit.patch_size}" if cfg.is_sd3 else \
                f"2^{len(cfg.unet.channel_mult) - 1} UNet downsamplings"
            raise UsageError(f"--{name} {v} is not a multiple of {unit}, this model's size unit (VAE factor "
                             f"{cfg.vae.downsample} x {why}); try {max(unit, v // unit * unit)} or "
                             f"{(v // unit + 1) * unit}")
    steps = args.steps or cfg.default_steps
    guidance = cfg.default_guidance if args.guidance is None else args.guidance
    slg, guidance = skip_layer_guidance(args, cfg, guidance)
    denoise = (0.8 if args.denoise is None else args.denoise) if image else None
    start = pipe.start_step(steps, denoise) if image else 0
    runs = steps - start   # the steps that run: the methods count these, from 0
    if runs < 1:
        raise UsageError(f"--denoise {denoise} of {steps} steps runs none (int({steps} x {denoise}) = 0); raise "
                         f"--denoise or --steps")
    sampler = args.sampler or cfg.default_sampler
    if args.shift is not None and not cfg.is_sd3:
        raise UsageError(f"--shift sets SD 3's rectified flow; {cfg.name} samples on SD's noise schedule")
    shift = (cfg.shift if args.shift is None else args.shift) if cfg.is_sd3 else None
    if args.edit_steps is not None and args.edit_steps > runs:
        within = f"the {runs} steps that run of --steps {steps} at --denoise {denoise}" if image else \
            f"--steps ({steps})"
        raise UsageError(f"--edit-steps must be between 0 and {within}, got {args.edit_steps}")
    if args.regulate_layers and not cfg.is_sd3:   # SD 3's joint blocks are checked by name in its set-up
        check_layer_sizes(args.regulate_layers, cfg, *size)
    method = chosen_method(args)
    from regulation.editors import method_for
    entry = method_for(method, pipe) if method else None   # refused here if it does not run on this model
    texts = entry.texts(args.prompt) if entry and entry.texts else 1   # Composable Diffusion: one per concept
    check_cost(cfg, *size, DTYPES[args.dtype], 1 + texts if guidance > 1 else 1, torch.device(args.device))
    pipe.compile(args.backend)
    pipe.decoder = None
    if args.decoder == "taesd" and cfg.is_sd3:
        raise UsageError("--decoder taesd is TAESD for SD 1/2/XL's 4-channel latents; SD 3 decodes with its VAE")
    if args.decoder == "taesd":
        from .taesd import load_taesd_decoder
        pipe.decoder = load_taesd_decoder(args.taesd, device=args.device, dtype=DTYPES[args.dtype]).decode

    # a prompt over 77 tokens: said once, here; the tokenizer's own warning (repeated at every use) is muted
    cut = pipe.tokenizer.kept(args.prompt)[1]
    for what, text in (("prompt", args.prompt), ("negative prompt", args.negative_prompt)):
        tail = cut if what == "prompt" else pipe.tokenizer.kept(text)[1]
        if tail:
            warn(f"the {what} is longer than the text encoder's {pipe.tokenizer.max_length} tokens; cut: \"{tail}\"")
    if cfg.is_sd3:
        if pipe.model.text_encoders.has_t5:
            for what, text in (("prompt", args.prompt), ("negative prompt", args.negative_prompt)):
                if tail := pipe.t5_tokenizer.cut(text):
                    warn(f"T5 reads the {what}'s first 226 characters, as Stability's reference; cut: \"{tail}\"")
        log(sd3_settings(args, pipe, steps, guidance, sampler, shift))

    seeds = [args.seed + i for i in range(args.n)]
    job = Job(args, pipe, seeds, size, steps, guidance, method, model_hash=model_hash(args.checkpoint),
              show_steps=attention_steps(runs), sampler=sampler, shift=shift)
    job.start = start
    if image:
        job.pipe_options.update(init_image=image, denoise=denoise)
        job.image_settings["Denoising strength"] = denoise
    if slg:
        job.pipe_options["slg"] = slg
        job.image_settings.update({"SLG scale": slg.scale, "SLG layers": " ".join(map(str, slg.layers)),
                                   "SLG start": slg.start, "SLG end": slg.end})
    shown = []
    if method or args.save_attention:
        # the model chooses how targets are read and which layers there are (a UNet's, or joint attention's)
        from regulation.editors import layer_selector, pick_targets, set_up
        targets = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            if entry is None or entry.takes_words:   # words: the maps to show
                words = args.targets.split() if args.targets else None
                targets = shown = pick_targets(pipe, args.prompt, words, log=log)
            elif "targets" in entry.takes:   # the method reads them itself (SynGen's pairs, Composable's concepts)
                targets = args.targets
            # built before sampling, so that a bad option is an error before any work; one per image (its seed)
            job.runs = [set_up(method, pipe, args.prompt, runs, start=start, targets=targets, seed=seed,
                               layers=args.regulate_layers, edit_steps=args.edit_steps, layout=args.layout,
                               guidance=guidance, height=size[0], width=size[1], sampler=sampler,
                               spacing=args.spacing, strength=args.strength, layout_background=args.layout_background,
                               weights=args.concept_weights, log=log if i == 0 else None)
                        for i, seed in enumerate(seeds)] if method else []
        if args.compile_optimizer:   # Attention Regulation's hooks read their config at every step
            for run in job.runs:
                for hook in run.hooks:
                    hook.config = replace(hook.config, compile=True)
                run.settings["Regulation optimiser"] = "compiled"
        # the maps shown are those the method acts on (the same layers in the plain run beside them)
        job.select = job.runs[0].select if job.runs else layer_selector(pipe, args.regulate_layers)
        shown = job.runs[0].shown if job.runs else shown
    job.positions = [p for t in shown or [] for p in t.positions]
    k = 0
    for t in shown or []:
        job.groups.append((t.word, list(range(k, k + len(t.positions)))))
        k += len(t.positions)
    return job


def sd3_settings(args, pipe, steps, guidance, sampler, shift):
    """The line that says which settings an SD 3 run uses and where they come from: they differ by file
    (Stability's reference keys them by the file's name, minisd/config.py: SD3_PRESETS)."""
    found = sd3_preset(args.checkpoint, getattr(pipe.model, "metadata", None))
    origin = f"{pipe.cfg.name}'s defaults" + (f" (recognised by {found[1]}, as Stability's sd3_infer.py picks them "
                                               f"by the file's name)" if found else "")
    given = lambda flag: f" ({flag})" if getattr(args, flag[2:]) is not None else ""
    return (f"SD 3 settings: {steps} steps{given('--steps')}, guidance {guidance:g}{given('--guidance')}, "
            f"{SAMPLER_NAMES.get(sampler, sampler)}{given('--sampler')}, shift {shift:g}{given('--shift')}; "
            f"the others {origin}")


def settings(job, seed, extra=None):
    """What is written beside an image (AUTOMATIC1111's keys first, then minisd's)."""
    args = job.args
    return {"Steps": job.steps, "Sampler": SAMPLER_NAMES.get(job.sampler, job.sampler), "Shift": job.shift,
            "Timestep spacing": args.spacing, "CFG scale": job.guidance, "Seed": seed,
            "Size": f"{job.size[1]}x{job.size[0]}", "Model hash": job.model_hash, "Model": Path(args.checkpoint).stem,
            "Eta": args.eta if job.sampler == "ddim" else None, "Prediction": job.pipe.cfg.prediction,
            "Dtype": args.dtype, "Decoder": args.decoder, **job.image_settings,
            **(extra or {}), "Version": f"minisd {__version__}"}


@dataclass
class Output:
    """One seed's result. image/settings: the method's (plain's without a method); panels: [(title, image,
    {step: (words, h, w)})], plain first, for each run whose maps were kept; run: the method's Run (its hooks
    hold their loss history)."""
    seed: int
    image: object
    settings: dict
    plain: object = None
    panels: list = field(default_factory=list)
    layers_seen: set = field(default_factory=set)
    run: object = None


def generate(job, i, callback=None, with_plain=None):
    """Image i of the job (seed job.seeds[i]): the method's run, then the plain one when --save-attention asks for
    it beside (or with_plain: the app always shows it), each with its maps when --save-attention is given.
    callback(info) is called after every sampling step of either run."""
    from .maps import AttentionMaps, word_maps
    from regulation.editors import METHODS
    args, seed = job.args, job.seeds[i]
    with_plain = bool(args.save_attention or not job.method) if with_plain is None else with_plain
    out = Output(seed, None, {})

    def observer():
        return AttentionMaps(job.positions, job.show_steps, job.select) if args.save_attention else None

    def first_image(maps):
        return {s: m[0] for s, m in word_maps(maps.result(), job.groups).items()}

    def sample(hooks, options=None):
        return job.pipe(args.prompt, negative_prompt=args.negative_prompt, steps=job.steps, guidance=job.guidance,
                        seed=seed, height=job.size[0], width=job.size[1], sampler=job.sampler, spacing=args.spacing,
                        hooks=hooks, callback=callback, **({"eta": args.eta} if job.sampler == "ddim" else {}),
                        **({"shift": job.shift} if job.shift is not None else {}),
                        **job.pipe_options, **(options or {})).images[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)   # said once, by prepare
        if job.method:
            run, maps = job.runs[i], observer()
            with run.context:
                out.image = sample(run.hooks + ([maps] if maps else []), run.options)
            out.run, out.settings = run, settings(job, seed, run.settings)
            if maps:
                out.panels.append((METHODS[job.method].title, out.image, first_image(maps)))
                out.layers_seen |= maps.blocks_seen
        if with_plain:
            maps = observer()
            out.plain = sample([maps] if maps else [])
            if maps:
                out.panels.insert(0, ("plain", out.plain, first_image(maps)))
                out.layers_seen |= maps.blocks_seen
            if not job.method:
                out.image, out.settings = out.plain, settings(job, seed)
    return out
