"""Composable Diffusion: a prompt that names several things is guided by each of them separately.

Liu, Li, Du, Torralba, Tenenbaum, "Compositional Visual Generation with Composable Diffusion Models" (ECCV 2022,
arXiv 2206.01714). The conjunction ("AND") of concepts c_1 .. c_k treats the model as a product of distributions,
one per concept, so that each concept adds its own guidance term:

    eps = eps(x, uncond) + sum_i w_i * (eps(x, c_i) - eps(x, uncond))

The pipeline computes it (`Pipeline(..., concepts=[(text, weight), ...])`, minisd/pipeline.py: one UNet batch of
the unconditional text and every concept, per image); this module turns a prompt into those keyword arguments:

    pipe(prompt, guidance=g, **composable_options(prompt, g))

What follows the authors' code (their `pipeline_composable_stable_diffusion.py`, which diffusers' community
pipeline `examples/community/composable_stable_diffusion.py` repeats), where it and the paper could be read
otherwise:
  - The default weight of every concept is the guidance scale itself, not guidance / k: with two concepts the
    image is pushed about twice as hard as by plain guidance. (An earlier version of the authors' pipeline
    normalised the weights to sum to 1 and multiplied the sum by the guidance; the current code has the paper's
    form above.)
  - Weights are given in concept order, as numbers or as the authors' string "w1 | w2 | ..."; a missing weight is
    the guidance scale. A negative weight pushes away from its concept (the paper's negation, "NOT").
  - A prompt with "|" is split at "|" only, each piece stripped of the spaces around it: that is the authors'
    syntax, and it lets a concept hold commas ("a castle in a forest | grainy, fog").
  - The whole prompt is never read by the UNet: only its concepts, and the unconditional text.
  - The unconditional text is the negative prompt (empty by default), encoded once and shared by every concept.
  - Guidance of 1 or less: their code then runs no unconditional pass and keeps only the last concept; here it
    is an error.

Where this module departs from the authors' code:
  - Without "|", a prompt is split at " and " (any case, so the paper's "AND" too) and at commas: "a cat, a dog and
    a bird" -> ["a cat", "a dog", "a bird"]. The rule knows no grammar: "black and white cat" becomes "black" and
    "white cat"; use "|" where that matters. Words that merely contain "and" ("sand", "a band") are kept whole.
  - Empty pieces ("a cat, , a dog") are dropped; a prompt that leaves fewer than 2 concepts is an error, where the
    authors' code falls back to plain guidance for a prompt without "|".
  - More weights than concepts is an error (their code drops the extra weights silently); fewer weights are filled
    with the guidance scale (their code appends it once, and fails when two or more are missing).
  - A negative prompt works as in plain guidance. (In their pipeline a string negative prompt is refused once the
    prompt is split, and a list of k negative prompts leaves only the last one in use.)
  - A batch: n images per call, each from its own seed, where their code composes one image per call. SDXL: each
    concept also brings its own pooled text and size vector.
  - Attention hooks (Attention Regulation's editors, attention-map observers) are refused together with concepts:
    hooks are told one block of conditional rows with one row per image, and a composed batch has k rows per image.
"""
import math
import re

from regulation.registry import Knob, Method, Run, register

# " and " between words, or a comma (with an "and" after it: the serial comma of "a cat, a dog, and a bird")
_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+", re.IGNORECASE)


def split_concepts(prompt):
    """The concepts of a prompt, each with its own words: at "|" if the prompt has one (the authors' syntax), else
    at " and " and commas. Fewer than 2 concepts: a ValueError."""
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be a string, got {type(prompt).__name__}")
    pieces = prompt.split("|") if "|" in prompt else _SEPARATOR.split(prompt.strip())
    concepts = [p.strip() for p in pieces if p.strip()]
    if len(concepts) < 2:
        raise ValueError(f"composable diffusion needs at least 2 concepts, separated by \" and \", commas or \"|\"; "
                         f"{prompt!r} gives {len(concepts)}: {concepts}")
    return concepts


def concept_weights(weights, k, guidance):
    """k weights from None (every weight is the guidance scale), a list of numbers, or the authors' "w1 | w2"
    string; missing ones are the guidance scale."""
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        given = []
    elif isinstance(weights, str):
        try:
            given = [float(w) for w in weights.split("|")]
        except ValueError:
            raise ValueError(f"concept weights must be numbers separated by \"|\" (e.g. \"7.5 | -5\"), got "
                             f"{weights!r}") from None
    else:
        given = list(weights)
    for w in given:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"each weight must be a finite number, got {w!r} in {weights!r}")
    if len(given) > k:
        raise ValueError(f"{len(given)} concept weights for {k} concepts: give at most one weight per concept")
    return [float(w) for w in given] + [float(guidance)] * (k - len(given))


def composable_options(prompt, guidance, weights=None):
    """The keyword arguments that make `Pipeline.__call__` compose the prompt's concepts:
    {"concepts": [(text, weight), ...]}. `guidance` (above 1) is still passed to the pipeline as usual; it is here
    as the default weight."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance > 1.0 \
            or not math.isfinite(guidance):
        raise ValueError(f"composable diffusion needs a finite guidance scale above 1 (it weighs each concept "
                         f"against the unconditional prediction), got {guidance!r}")
    concepts = split_concepts(prompt)
    return {"concepts": list(zip(concepts, concept_weights(weights, len(concepts), guidance)))}


def set_up(pipe, prompt, steps, targets=None, strength=None, weights=None, guidance=None, **run):
    """regulation.editors.set_up's Run of Composable Diffusion: targets, its concepts ("a red circle | a blue
    square"; None: the prompt split at "and" and commas); guidance: the run's scale (None: the model's); weights,
    one per concept ("7.5 | -5" or numbers), or strength, every concept's weight."""
    if strength is not None and weights is not None:
        raise ValueError("give --strength (every concept's weight) or --concept-weights, not both")
    guidance = pipe.cfg.default_guidance if guidance is None else guidance
    options = composable_options(targets or prompt, guidance, weights)
    if strength is not None:
        options["concepts"] = [(c, float(strength)) for c, _ in options["concepts"]]
    settings = {"Regulation concepts": " | ".join(c for c, _ in options["concepts"])}
    if strength is not None or weights is not None:
        settings["Regulation concept weights"] = " | ".join(f"{w:g}" for _, w in options["concepts"])
    return Run(options=options, settings=settings)


# The authors' README: the concepts' weights, "otherwise the same as scale" (the guidance), are the knob; recorded
# as the weights used.
METHOD = register(Method(
    "composable", "Composable Diffusion",
    Knob("strength", "concept weight", None, "every concept's weight", minimum=None, recorded=False),
    takes={"targets", "strength", "weights"}, set_up=set_up, target_words=False,
    about="Composable Diffusion (Liu et al. 2022), one guidance term per concept of the prompt (split at 'and', "
          "commas or '|')",
    maps_absent="changes the guidance, not the attention", texts=lambda prompt: len(split_concepts(prompt)),
    not_joint="Composable Diffusion's guidance is the UNet's"))
