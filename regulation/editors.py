"""From a prompt and a few options to what a method adds to a pipeline call: what the command line and the
benchmark share. The pipeline takes the returned hooks and options and does not know which method it is.

    targets = choose_targets(pipe.tokenizer, prompt, ["circle", "square"])     # prints the token table
    run = set_up("regulate", pipe, prompt, steps=50, targets=targets, seed=0)
    with run.context:
        image = pipe(prompt, steps=50, seed=0, hooks=run.hooks, **run.options).images[0]

Methods (the Attention Regulation paper's table):
  regulate       Attention Regulation (Zhang et al., ECCV 2024): edits the target words' cross-attention logits
  attend-excite  Attend-and-Excite (Chefer et al., SIGGRAPH 2023): moves the latents until every target is attended
  syngen         SynGen (Rassin et al., NeurIPS 2023): moves the latents so that modifiers' maps lie on their nouns'
  dense          DenseDiffusion (Kim et al., ICCV 2023): given a layout, modulates cross- and self-attention
  composable     Composable Diffusion (Liu et al., ECCV 2022): one guidance term per concept; no attention edit
"""
from contextlib import nullcontext
import math
from dataclasses import dataclass, field, replace

from .attend_excite import AttendExcite, AttendExciteConfig
from .attention_regulation import AttentionRegulation, RegulationConfig
from .targets import Target, auto_targets, eot_position, resolve_targets, token_table

METHODS = ("regulate", "attend-excite", "syngen", "dense", "composable")
NAMES = {"regulate": "Attention Regulation", "attend-excite": "Attend-and-Excite", "syngen": "SynGen",
         "dense": "DenseDiffusion", "composable": "Composable Diffusion"}
# which options each method takes; anything else given to it is refused by name
TAKES = {"regulate": {"targets", "layers", "edit_steps"},
         "attend-excite": {"targets", "layers", "edit_steps", "strength"},
         "syngen": {"targets", "layers", "edit_steps", "strength"},
         "dense": {"layout", "layers", "strength", "layout_background", "phrase_swap"},
         "composable": {"targets", "strength", "weights"}}


@dataclass(frozen=True)
class Knob:
    """A method's one strength knob: the one its authors' README or demo tells users to turn. `option` is the
    set_up argument (and command-line flag) that sets it; `default` its authors' value (None: the guidance)."""
    option: str
    name: str
    default: float | None


# Attention Regulation's README documents one option, --edit-steps (25 of 50); its optimiser's constants are not
# exposed. Attend-and-Excite's config and SynGen's run.py: the latent step size (scale_factor, --step_size).
# DenseDiffusion's demo: the sliders w^c and w^s (1.0 and 0.3), scaled together. Composable Diffusion's README:
# the concepts' weights, "otherwise the same as scale" (the guidance).
KNOBS = {"regulate": Knob("edit_steps", "edit steps", 25),
         "attend-excite": Knob("strength", "step size", 20.0),
         "syngen": Knob("strength", "step size", 20.0),
         "dense": Knob("strength", "creg/sreg scale", 1.0),
         "composable": Knob("strength", "concept weight", None)}


def choose_targets(tokenizer, prompt, words=None, log=print):
    """Resolve target words (all sub-tokens of each word); with none given, the nouns of the prompt's noun
    phrases (targets.auto_targets) within the part the text encoder reads. Prints what was chosen and the resolved
    token table. `tokenizer` may be a list (SDXL's two)."""
    if not words:
        kept = (tokenizer[0] if isinstance(tokenizer, (list, tuple)) else tokenizer).kept(prompt)[0]
        words = auto_targets(kept)
        if not words:
            raise ValueError(f"found no object words in {kept!r}; name them with --targets")
        log(f"targets chosen from the prompt: {' '.join(words)}")
    targets = resolve_targets(tokenizer, prompt, words)
    log(token_table(tokenizer, prompt, targets))
    return targets


def make_editor(method, pipe, prompt, targets, steps, seed=0, layers=None, edit_steps=None, config=None):
    """The hook of Attention Regulation or Attend-and-Excite regulating `targets` (from choose_targets) of
    `prompt`, for a run of `steps` steps."""
    positions = [p for t in targets for p in t.positions]
    if method == "regulate":
        config = replace(config or RegulationConfig(), layers=layers or (config.layers if config else None),
                      edit_steps=edit_steps if edit_steps is not None else (config.edit_steps if config else None))
        return AttentionRegulation(positions, eot_position(pipe.tokenizer, prompt), steps, config=config,
                                   model_config=pipe.cfg, generator=seed)
    if method == "attend-excite":
        # edit_steps is A&E's max_iter_to_alter (a step index, not scaled by `steps`: see attend_excite.py);
        # A&E draws no random numbers, so `seed` is unused. Each target keeps all its sub-tokens.
        if config is not None and not isinstance(config, AttendExciteConfig):
            raise TypeError(f"attend-excite takes an AttendExciteConfig, got {type(config).__name__}")
        config = config or AttendExciteConfig()
        config = replace(config, layers=layers or config.layers,
                      max_iter_to_alter=edit_steps if edit_steps is not None else config.max_iter_to_alter)
        return AttendExcite([t.positions for t in targets], steps, config=config, model_config=pipe.cfg,
                            eot=eot_position(pipe.tokenizer, prompt))
    raise ValueError(f"make_editor makes regulate and attend-excite hooks, not {method!r}; use set_up")


@dataclass
class Run:
    """What `method` adds to one pipeline call: `hooks` to pass, `options` (keyword arguments of the call), a
    `context` to make the call in; `select`, the layers whose maps it acts on, and `shown`, the words whose
    maps it acts on (None for a method that acts on no attention map); `settings`, what to record beside the
    image."""
    method: str
    hooks: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    context: object = field(default_factory=nullcontext)
    select: object = None
    shown: list = None
    settings: dict = field(default_factory=dict)


def set_up(method, pipe, prompt, steps, targets=None, seed=0, layers=None, edit_steps=None, layout=None,
           guidance=None, height=None, width=None, sampler="dpmpp_2m", spacing="leading", strength=None,
           layout_background=None, phrase_swap=None, weights=None, log=print):
    """The Run of `method` for one image of `prompt` (seed: that image's seed). targets: Targets from
    choose_targets (regulate, attend-excite), or for syngen a string of its pairs ("red circle; blue square",
    None: parsed from the prompt), for composable its concepts ("a red circle | a blue square", None: the
    prompt split at "and" and commas); layout: DenseDiffusion's (see regulation/dense_diffusion.py); guidance: the
    run's scale (composable). strength: the method's knob (KNOBS; Attention Regulation's is edit_steps), None:
    its authors' default. DenseDiffusion: layout_background ("region", the default, or "none") and phrase_swap
    (the phrases' own embeddings, default True). Composable: weights, one per concept ("7.5 | -5" or numbers).
    An option the method does not take is a ValueError naming it."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    given = {"targets": targets, "layers": layers, "edit_steps": edit_steps, "layout": layout, "strength": strength,
             "layout_background": layout_background, "phrase_swap": phrase_swap, "weights": weights}
    extra = [k for k, v in given.items() if v is not None and k not in TAKES[method]]
    if extra:
        flags = ", ".join("--" + k.replace("_", "-").replace("layers", "regulate-layers")
                          .replace("weights", "concept-weights") for k in extra)
        raise ValueError(f"--method {method} ({NAMES[method]}) does not take {flags}")
    if strength is not None and not (isinstance(strength, (int, float)) and math.isfinite(strength)
                                     and (strength >= 0 or method == "composable")):
        raise ValueError(f"--strength ({NAMES[method]}'s {KNOBS[method].name}) must be a finite number"
                         f"{'' if method == 'composable' else ' >= 0'}, got {strength!r}")
    if strength is not None and weights is not None:
        raise ValueError("give --strength (every concept's weight) or --concept-weights, not both")
    settings = {"Regulation": NAMES[method]}
    if strength is not None and method != "composable":   # composable's: its concept weights, below
        settings[f"Regulation {KNOBS[method].name}"] = f"{strength:g}"
    if method in ("regulate", "attend-excite"):
        if not targets:
            raise ValueError(f"{NAMES[method]} needs target words")
        config = None if strength is None else AttendExciteConfig(scale_factor=float(strength))
        hook = make_editor(method, pipe, prompt, targets, steps, seed=seed, layers=layers, edit_steps=edit_steps,
                           config=config)
        settings.update({"Regulation targets": " ".join(t.word for t in targets),
                         "Regulation layers": " ".join(hook.select.specs), "Regulation edit steps": hook.edit_steps})
        return Run(method, [hook], select=hook.select, shown=list(targets), settings=settings)
    if method == "syngen":
        from .syngen import SynGenConfig, make_syngen
        config = SynGenConfig()
        if edit_steps is not None:
            config = replace(config, max_iter_to_alter=edit_steps)
        if strength is not None:
            config = replace(config, scale_factor=float(strength))
        hook = make_syngen(pipe, prompt, steps, layers=layers, pairs=targets, config=config, log=log)
        ids = pipe.tokenizer.ids(prompt)
        word = lambda ps: "".join(pipe.tokenizer.token_text(ids[p]) for p in ps).replace("</w>", " ").strip()
        # each modifier beside its noun: the maps the loss pulls together
        shown = [Target(word(ps), ps, []) for mods, noun in hook.pairs for ps in [*mods, noun]]
        settings.update({"Regulation targets": "; ".join(" ".join(word(ps) for ps in [*m, n]) for m, n in hook.pairs),
                         "Regulation layers": " ".join(hook.select.specs), "Regulation edit steps": hook.edit_steps})
        return Run(method, [hook], select=hook.select, shown=shown, settings=settings)
    if method == "dense":
        from .dense_diffusion import (NEEDS_LAYOUT, DenseDiffusionConfig, layout_masks, make_dense, phrase_embeddings,
                                      resolve_phrases)
        if not layout:
            raise ValueError(NEEDS_LAYOUT)
        # boxes and mask files become masks once, here; make_dense takes the (phrase, mask) pairs as they are
        phrases, masks = layout_masks(layout, height or pipe.cfg.image_size, width or pipe.cfg.image_size)
        config = DenseDiffusionConfig(layers=layers, background=layout_background or "region")
        if strength is not None:
            config = replace(config, creg=config.creg * strength, sreg=config.sreg * strength)
        hook = make_dense(pipe, prompt, steps, list(zip(phrases, masks)), config,
                          height=height, width=width, sampler=sampler, spacing=spacing)
        shown = resolve_phrases(pipe, prompt, phrases)
        from .layers import LayerSelector
        # it modulates every layer (config.layers: some); its maps are shown where regulation's would be
        select = LayerSelector(layers, pipe.cfg)
        settings.update({"Regulation layout": "; ".join(phrases), "Regulation layers": layers or "all",
                         "Regulation edit steps": hook.edit_steps})
        if config.background != "region":
            settings["Regulation layout background"] = config.background
        swap = phrase_swap is None or phrase_swap
        if not swap:
            settings["Regulation phrase swap"] = "off"
        return Run(method, [hook], context=phrase_embeddings(pipe, prompt, phrases) if swap else nullcontext(),
                   select=select, shown=shown, settings=settings)
    from .composable import composable_options
    guidance = pipe.cfg.default_guidance if guidance is None else guidance
    options = composable_options(targets or prompt, guidance, weights)
    if strength is not None:
        options["concepts"] = [(c, float(strength)) for c, _ in options["concepts"]]
    settings["Regulation concepts"] = " | ".join(c for c, _ in options["concepts"])
    if strength is not None or weights is not None:
        settings["Regulation concept weights"] = " | ".join(f"{w:g}" for _, w in options["concepts"])
    return Run(method, options=options, settings=settings)
