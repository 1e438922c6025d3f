"""From a prompt and a few options to the attention hook of a method: what the command line and the benchmark
share. The pipeline takes the returned hook and does not know which method it is."""
from dataclasses import replace

from .attention_regulation import AttentionRegulation, RegulationConfig
from .targets import auto_targets, eot_position, resolve_targets, token_table

METHODS = ("regulate",)


def choose_targets(tokenizer, prompt, words=None, log=print):
    """Resolve target words (all sub-tokens of each word); with none given, the nouns of the prompt's noun
    phrases (targets.auto_targets). Prints what was chosen and the resolved token table."""
    if not words:
        words = auto_targets(prompt)
        if not words:
            raise ValueError(f"found no object words in {prompt!r}; name them with --targets")
        log(f"targets chosen from the prompt: {' '.join(words)}")
    targets = resolve_targets(tokenizer, prompt, words)
    log(token_table(tokenizer, prompt, targets))
    return targets


def make_editor(method, pipe, prompt, targets, steps, seed=0, layers=None, edit_steps=None, config=None):
    """The hook for `method` regulating `targets` (from choose_targets) of `prompt`, for a run of `steps` steps."""
    positions = [p for t in targets for p in t.positions]
    if method == "regulate":
        cfg = replace(config or RegulationConfig(), layers=layers or (config.layers if config else None),
                      edit_steps=edit_steps if edit_steps is not None else (config.edit_steps if config else None))
        return AttentionRegulation(positions, eot_position(pipe.tokenizer, prompt), steps, config=cfg,
                                   model_config=pipe.cfg, generator=seed)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
