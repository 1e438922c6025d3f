"""From a prompt and a few options to the attention hook of a method: what the command line and the benchmark
share. The pipeline takes the returned hook and does not know which method it is."""
from dataclasses import replace

from .attend_excite import AttendExcite, AttendExciteConfig
from .attention_regulation import AttentionRegulation, RegulationConfig
from .targets import auto_targets, eot_position, resolve_targets, token_table

METHODS = ("regulate", "attend-excite")


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
    if method == "attend-excite":
        # edit_steps is A&E's max_iter_to_alter (a step index, not scaled by `steps`: see attend_excite.py);
        # A&E draws no random numbers, so `seed` is unused. Each target keeps all its sub-tokens.
        if config is not None and not isinstance(config, AttendExciteConfig):
            raise TypeError(f"attend-excite takes an AttendExciteConfig, got {type(config).__name__}")
        cfg = config or AttendExciteConfig()
        cfg = replace(cfg, layers=layers or cfg.layers,
                      max_iter_to_alter=edit_steps if edit_steps is not None else cfg.max_iter_to_alter)
        return AttendExcite([t.positions for t in targets], steps, config=cfg, model_config=pipe.cfg,
                            eot=eot_position(pipe.tokenizer, prompt))
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
