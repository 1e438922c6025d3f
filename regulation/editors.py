"""From a prompt and a few options to what a method adds to a pipeline call, on a UNet or on joint attention alike:
what the command line, the page and the benchmark share. The pipeline takes the returned hooks and options and
does not know which method it is.

    targets = pick_targets(pipe, prompt, ["circle", "square"])     # prints the token table(s)
    run = set_up("regulate", pipe, prompt, steps=50, targets=targets, seed=0)
    with run.context:
        image = pipe(prompt, steps=50, seed=0, hooks=run.hooks, **run.options).images[0]

Methods (the Attention Regulation paper's table), each one module that registers itself in the table METHODS
(regulation/registry.py says what an entry declares); importing this module imports them all:
  regulate       Attention Regulation (Zhang et al., ECCV 2024): edits the target words' cross-attention logits
  attend-excite  Attend-and-Excite (Chefer et al., SIGGRAPH 2023): moves the latents until every target is attended
  syngen         SynGen (Rassin et al., NeurIPS 2023): moves the latents so that modifiers' maps lie on their nouns'
  dense          DenseDiffusion (Kim et al., ICCV 2023): given a layout, modulates cross- and self-attention
  composable     Composable Diffusion (Liu et al., ECCV 2022): one guidance term per concept; no attention edit

The model chooses the rest: on joint attention (SD 3's MMDiT, regulation/joint_regulation.py) the targets are
read in CLIP and T5, the layers are joint blocks, and a method that does not run there is refused, saying why.
"""
import math

# imported for their registration, in the paper's order (the table's order)
from . import attention_regulation, attend_excite, syngen, dense_diffusion, composable
from .joint_regulation import JointBlockSelector, choose_joint_targets, is_joint
from .layers import LayerSelector
from .registry import METHODS, OPTIONS, flag
from .targets import auto_targets, resolve_targets, token_table

# the table in the paper's order, whichever of the modules was imported first
for _module in (attention_regulation, attend_excite, syngen, dense_diffusion, composable):
    METHODS[_module.METHOD.name] = METHODS.pop(_module.METHOD.name)


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


def pick_targets(pipe, prompt, words=None, log=print):
    """Target words as `pipe`'s model reads them: choose_targets in its CLIP tokenizers, or on joint attention
    choose_joint_targets (CLIP and T5)."""
    if is_joint(pipe.cfg):
        return choose_joint_targets(pipe, prompt, words, log)
    return choose_targets(pipe.tokenizers, prompt, words, log=log)


def layer_selector(pipe, specs=None):
    """The layers `specs` names in `pipe`'s model (None: its default): LayerSelector, or JointBlockSelector on joint
    attention."""
    return (JointBlockSelector if is_joint(pipe.cfg) else LayerSelector)(specs, pipe.cfg)


def and_list(words):
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def method_for(name, pipe=None):
    """The table's entry of `name`; with a pipe, refused in one line if the method does not run on its model."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    method = METHODS[name]
    if pipe is not None and method.not_joint and is_joint(pipe.cfg):
        joint = [n for n, m in METHODS.items() if not m.not_joint]
        raise ValueError(f"{name!r} does not run on SD 3: only {and_list(joint)} read its joint attention "
                         f"({method.not_joint})")
    return method


def make_editor(method, pipe, prompt, targets, steps, seed=0, layers=None, edit_steps=None, config=None):
    """The hook of `method` ("regulate" or "attend-excite": those with a make_editor) regulating `targets` (from
    pick_targets) of `prompt`, for a run of `steps` steps, on a UNet or on joint attention; config: the method's
    own (RegulationConfig, AttendExciteConfig)."""
    m = method_for(method, pipe)
    if m.make_editor is None:
        makers = [n for n, x in METHODS.items() if x.make_editor]
        raise ValueError(f"make_editor makes {and_list(makers)} hooks, not {method!r}; use set_up")
    return m.make_editor(pipe, prompt, targets, steps, seed=seed, layers=layers, edit_steps=edit_steps, config=config)


def set_up(method, pipe, prompt, steps, targets=None, seed=0, layers=None, edit_steps=None, layout=None,
           guidance=None, height=None, width=None, sampler="dpmpp_2m", spacing="leading", strength=None,
           layout_background=None, phrase_swap=None, weights=None, config=None, start=0, log=print):
    """The Run of `method` for one image of `prompt` (seed: that image's seed) on `pipe`'s model, UNet or joint
    attention. targets: Targets from pick_targets (regulate, attend-excite), or for syngen a string of its pairs
    ("red circle; blue square", None: parsed from the prompt), for composable its concepts ("a red circle | a blue
    square", None: the prompt split at "and" and commas); layout: DenseDiffusion's (see
    regulation/dense_diffusion.py); guidance: the run's scale (composable). strength: the method's knob
    (METHODS[method].knob; Attention Regulation's is edit_steps), None: its authors' default. DenseDiffusion:
    layout_background ("region", the default, or "none") and phrase_swap (the phrases' own embeddings, default
    True). Composable: weights, one per concept ("7.5 | -5" or numbers). config: the method's own config
    (RegulationConfig, AttendExciteConfig) where it takes one; strength and the options above override it.
    start: image-to-image's first step (the methods count the `steps` that run from there; DenseDiffusion keeps
    those steps' timesteps). An option the method does not take, or a method that does not run on the model, is a
    ValueError naming it."""
    m = method_for(method, pipe)
    joint = is_joint(pipe.cfg)
    given = dict(targets=targets, layers=layers, edit_steps=edit_steps, layout=layout, strength=strength,
                 layout_background=layout_background, phrase_swap=phrase_swap, weights=weights, config=config)
    takes = m.joint_takes if joint and m.joint_takes is not None else m.takes
    extra = [k for k in OPTIONS if given[k] is not None and k not in takes]
    if extra:
        raise ValueError(f"--method {method} ({m.title}){' on SD 3' if joint else ''} does not take "
                         f"{', '.join(map(flag, extra))}")
    knob = m.knob
    if strength is not None and not (isinstance(strength, (int, float)) and math.isfinite(strength)
                                     and (knob.minimum is None or strength >= knob.minimum)):
        raise ValueError(f"--strength ({m.title}'s {knob.name}) must be a finite number"
                         f"{'' if knob.minimum is None else f' >= {knob.minimum:g}'}, got {strength!r}")
    run = m.set_up(pipe, prompt, steps, **{k: given[k] for k in takes}, seed=seed, guidance=guidance,
                   height=height, width=width, sampler=sampler, spacing=spacing, start=start, log=log)
    settings = {"Regulation": m.title}
    if strength is not None and knob.recorded:
        settings[f"Regulation {knob.name}"] = f"{strength:g}"
    run.method, run.settings = method, {**settings, **run.settings}
    return run
