"""Target words -> token positions, the printed table, and the automatic choice of objects."""
import json
import os
import warnings
from pathlib import Path

import pytest

from minisd.tokenizer import PromptTruncatedWarning, Tokenizer
from regulation.targets import (COLOURS, TargetError, auto_targets, eot_position, resolve_targets,
                                token_table)

SHARED = Path(os.environ.get("MINISD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_single_token_words(tok):
    cat, dog = resolve_targets(tok, "a cat and a dog", ["cat", "dog"])
    assert (cat.word, cat.positions, cat.tokens) == ("cat", [2], ["cat</w>"])
    assert (dog.positions, dog.tokens) == ([5], ["dog</w>"])


def test_case_insensitive(tok):
    assert resolve_targets(tok, "A Red CIRCLE", ["circle"])[0].positions == [3]
    assert resolve_targets(tok, "a red circle", ["CiRcLe"])[0].positions == [3]


def test_multi_token_word_takes_all_its_positions(tok):
    assert len(tok.encode("capybara")) > 1  # else this test tests nothing
    (t,) = resolve_targets(tok, "a photo of a capybara", ["capybara"])
    assert t.positions == [5, 6, 7] and "".join(t.tokens) == "capybara</w>"


def test_match_starts_at_a_word_boundary(tok):
    assert tok.encode("firetruck")[-1:] == tok.encode("truck")  # "truck" is the tail of "firetruck"
    prompt = "a firetruck next to a truck"
    (t,) = resolve_targets(tok, prompt, ["truck"])
    assert t.positions == [len(tok.encode("a firetruck next to a")) + 1]
    with pytest.raises(TargetError):
        resolve_targets(tok, prompt, ["truck#2"])


def test_repeated_word_occurrences(tok):
    prompt = "a dog chases a cat and a dog"
    first, second = resolve_targets(tok, prompt, ["dog", "dog#2"])
    assert first.positions == [2] and second.positions == [8]
    assert resolve_targets(tok, prompt, ["dog#1"])[0].positions == [2]
    with pytest.raises(TargetError, match="dog#3.*occurs 2 time"):
        resolve_targets(tok, prompt, ["dog#3"])
    with pytest.raises(TargetError, match="same tokens"):
        resolve_targets(tok, prompt, ["dog", "dog#1"])
    with pytest.raises(TargetError, match="number"):
        resolve_targets(tok, prompt, ["dog#x"])


def test_unknown_target_lists_the_prompt_tokens(tok):
    with pytest.raises(TargetError) as err:
        resolve_targets(tok, "a cat and a dog", ["horse"])
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "'horse'" in msg and "not in the prompt" in msg
    for pos, token in [(1, "a</w>"), (2, "cat</w>"), (5, "dog</w>"), (6, "<|endoftext|>")]:
        assert any(line.split()[:2] == [str(pos), token] for line in msg.splitlines()), (pos, token, msg)


def test_phrase_target_and_string_of_words(tok):
    (t,) = resolve_targets(tok, "a teddy bear on a chair", ["teddy bear"])
    assert t.positions == [2, 3]
    assert [t.word for t in resolve_targets(tok, "a teddy bear on a chair", "bear chair")] == ["bear", "chair"]


@pytest.mark.parametrize("pad_with_eot", [True, False])
def test_eot_position(pad_with_eot):
    tok = Tokenizer(pad_with_eot=pad_with_eot)
    assert eot_position(tok, "a cat") == 3
    assert eot_position(tok, "") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        assert eot_position(tok, "cat " * 100) == 76
        # a target cut off by truncation is not in what the model sees
        with pytest.raises(TargetError):
            resolve_targets(tok, "cat " * 100 + "dog", ["dog"])


def test_positions_stay_inside_the_prompt(tok):
    prompt = "a red circle and a blue square"
    e = eot_position(tok, prompt)
    for t in resolve_targets(tok, prompt, auto_targets(prompt) + ["a", "a#2"]):
        assert all(1 <= p < e for p in t.positions)


def test_token_table(tok):
    prompt = "a capybara and a dog"
    table = token_table(tok, prompt, resolve_targets(tok, prompt, ["capybara", "dog"]))
    rows = [line.split() for line in table.splitlines()[1:]]
    assert rows == [["2", "cap", "capybara"], ["3", "y", "capybara"], ["4", "bara</w>", "capybara"],
                    ["7", "dog</w>", "dog"]]
    whole = token_table(tok, prompt).splitlines()
    assert whole[0].split() == ["pos", "token", "word"]
    assert len(whole) == 1 + eot_position(tok, prompt) + 1  # header + positions 0..e
    assert whole[3].split() == ["2", "cap", "capybara"]


@pytest.mark.parametrize("prompt, expected", [
    ("a cat and a dog", ["cat", "dog"]),
    ("a red circle and a blue square", ["circle", "square"]),
    ("a photo of a red circle with a green star", ["circle", "star"]),
    ("a blue square next to a red circle", ["square", "circle"]),
    ("a horse and a yellow clock", ["horse", "clock"]),
    ("a elephant with a glasses", ["elephant", "glasses"]),
    ("An oil painting of a fox in front of a house", ["fox", "house"]),
    ("a teddy bear to the left of a cup", ["bear", "cup"]),
    ("a dog sitting on a bench, digital art", ["dog", "bench"]),
    ("a black and white photo of a dining table", ["table"]),
    ("a photo of an orange", ["orange"]),
    ("the car is red", ["car"]),
    ("a cat and a cat", ["cat", "cat#2"]),
])
def test_auto_targets(prompt, expected):
    assert auto_targets(prompt) == expected


def test_auto_targets_on_attend_and_excite_prompts(tok):
    path = SHARED / "benchmarks" / "attend-and-excite" / "a.e_prompts.txt"
    if not path.is_file():
        pytest.skip(f"the Attend-and-Excite prompt set is not at {path} (../shared absent)")
    prompts = [p for group in json.loads(path.read_text()).values() for p in group]
    assert len(prompts) == 276
    for p in prompts:
        words = auto_targets(p)
        # every A&E prompt names two things: "a {animal|colour object} and/with a {animal|colour object}"
        assert len(words) == 2, (p, words)
        assert not COLOURS & set(words), (p, words)
        resolve_targets(tok, p, words)
