"""tools/eval/paper_table.py: the fair table's protocol (validation set, knobs, the choice rule) and both stages
end to end on a tiny random model; the shapes world's tiny CLIP (tools/testbed/clipscore.py) on rendered scenes."""
import json

import numpy as np
import pytest

from minisd.checkpoint import DEFAULT_CHECKPOINT, build_model, save_checkpoint
from minisd.config import tiny
from regulation.editors import METHODS
from tools.eval import paper_table as pt
from tools.testbed import clipscore, shapes


def test_validation_set_is_disjoint_from_the_test_set():
    val, test = pt.validation_prompts(), pt.test_prompts()
    assert len(val) == 40 and len(test) == 100
    pairs = lambda items: {frozenset(d["objects"]) for d in items}
    assert not pairs(val) & pairs(test)                          # no test pair, so no test prompt
    assert pairs(val) | pairs(test) == {frozenset(p) for p in shapes.held_out_pairs()}
    assert all(sum(frozenset(d["objects"]) == p for d in val) == 2 for p in pairs(val))
    assert len({d["prompt"] for d in val}) == 40
    assert not {pt.VALIDATION_SEED, pt.VALIDATION_SEED + 1} & set(range(pt.TEST_SEEDS))


def test_every_method_gets_four_values_with_its_default():
    for m in pt.METHODS:
        values = pt.grid_values(m, 5.0)
        assert len(values) == 4 and pt.default_value(m, 5.0) in values, m
    assert pt.grid_values("regulate", 5.0) == [6, 13, 25, 50]
    assert pt.grid_values("composable", 5.0) == [1.25, 2.5, 5.0, 10.0]      # the guidance is its default weight
    assert pt.variant("syngen", 20.0).name == "syngen" and pt.variant("syngen", 5.0).options == {"strength": 5.0}
    assert pt.variant("regulate", 13).options == {"edit_steps": 13}
    assert set(METHODS) == set(pt.METHODS)


def summary_of(table):
    """A summarise()-like dict from {variant name: (presence, strict)}."""
    return {name: {"types": {"presence": (p, None, 0, 0), "strict": (s, None, 0, 0)}} for name, (p, s) in table.items()}


def test_choice_rule():
    name = lambda v: pt.variant("syngen", v).name
    cases = [({5: (0.5, 0.1), 10: (0.6, 0.1), 20: (0.4, 0.3), 40: (0.3, 0.3)}, 10),      # presence first
             ({5: (0.6, 0.1), 10: (0.6, 0.2), 20: (0.4, 0.3), 40: (0.3, 0.3)}, 10),      # ties: strict
             ({5: (0.6, 0.2), 10: (0.6, 0.2), 20: (0.6, 0.2), 40: (0.3, 0.3)}, 20),      # then the default
             ({5: (0.6, 0.2), 10: (0.6, 0.2), 20: (0.5, 0.2), 40: (0.6, 0.2)}, 5)]       # then the smaller
    for table, want in cases:
        summary = summary_of({name(v): ps for v, ps in table.items()})
        assert pt.choose(summary, {"syngen": [5.0, 10.0, 20.0, 40.0]}, 5.0) == {"syngen": want}


def test_rule_8_extends_a_choice_on_its_grids_edge():
    assert pt.beyond_edge("syngen", [5.0, 10.0, 20.0, 40.0], 5.0) == [2.5, 1.25]          # below: x1/2, x1/4
    assert pt.beyond_edge("attend-excite", [5.0, 10.0, 20.0, 40.0], 40.0) == [80.0, 160.0]  # above: x2, x4
    assert pt.beyond_edge("composable", [1.25, 2.5, 5.0, 10.0], 2.5) == []                  # inside: nothing
    assert pt.beyond_edge("regulate", [6, 13, 25, 50], 6) == [3, 2]                         # whole edit steps
    name = lambda v: pt.variant("syngen", v).name
    table = {1.25: (0.5, 0.1), 2.5: (0.7, 0.1), 5: (0.6, 0.1), 10: (0.6, 0.2), 20: (0.4, 0.3), 40: (0.3, 0.3)}
    summary = summary_of({name(v): ps for v, ps in table.items()})
    grid = {"syngen": sorted([5.0, 10.0, 20.0, 40.0] + pt.beyond_edge("syngen", [5.0, 10.0, 20.0, 40.0], 5.0))}
    assert pt.choose(summary, grid, 5.0) == {"syngen": 2.5}                                  # rule 5 over them all
    # a second extension, of other methods, keeps the first one's values and the choices before any extension
    first = {"grid": {"syngen": [1.25, 2.5, 5.0, 10.0, 20.0, 40.0], "dense": [0.25, 0.5, 1.0, 2.0]},
             "choices": {"syngen": 2.5, "dense": 2.0}, "extended": {"syngen": [2.5, 1.25]},
             "choices_before_extension": {"syngen": 5.0, "dense": 2.0}}
    grid, extended, before = pt.extend_grid(first, ["dense"])
    assert extended == {"syngen": [2.5, 1.25], "dense": [4.0, 8.0]} and before == {"syngen": 5.0, "dense": 2.0}
    assert grid == {"syngen": [1.25, 2.5, 5.0, 10.0, 20.0, 40.0], "dense": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]}


class FakeScore:
    """A scorer with the ClipScore interface (the shipped tiny CLIP matches only the shipped model's text tower)."""
    settings = "fake"

    def scores(self, image, prompt, objects=None):
        return {"clip": float(np.asarray(image).mean()) / 255}


def test_both_stages_end_to_end(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model(tiny(image_size=32)), ckpt)
    monkeypatch.setattr(pt, "SCORER", "tests.test_paper_table:FakeScore")
    out = tmp_path / "table"
    common = ["--out", str(out), "--checkpoint", str(ckpt), "--limit", "1", "--steps", "2", "--threads", "1",
              "--methods", "regulate,dense"]
    with pytest.raises(SystemExit, match="run the validation stage first"):
        pt.main(["test", *common])
    choices = pt.main(["validate", *common])
    saved = json.loads((out / "choices.json").read_text())
    assert saved["choices"] == choices and set(choices) == {"regulate", "dense"}
    assert all(choices[m] in saved["grid"][m] for m in choices)
    grid = (out / "validation.md").read_text()
    assert grid.count("(authors' default)") == 2 and grid.count("**chosen**") == 2
    rows = (out / "validation" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * (1 + 2 * 4)                     # 1 prompt x 2 seeds x (plain + 2 knobs x 4)

    pt.main(["test", *common])
    table = (out / "table.md").read_text()
    for cell in ("| plain SD |", "| Attention Regulation | authors' defaults |", "tuned: edit steps",
                 "ablation: no phrase swap", "| presence | strict | exact | CLIP |", "+48.8%"):
        assert cell in table, cell
    test_rows = (out / "test" / "results.csv").read_text()
    assert "dense[layout given] no phrase swap" in test_rows and '"clip"' in test_rows


# ----------------------------------------------------------------------------------------------------------
# the tiny CLIP

def test_tiny_clip_ranks_a_rendered_scene_above_its_hard_negatives():
    scorer = clipscore.ClipScore()
    shapes.SUPERSAMPLE = 4
    wins = []
    for k, item in enumerate(shapes.benchmark_prompts(12, 3)):
        objects = [tuple(o) for o in item["objects"]]
        scene = shapes.sample_scene(np.random.default_rng(k), keys=objects)
        image = shapes.render(scene, 128)
        true = scorer.scores(image, item["prompt"])["clip"]
        for kind, other in clipscore.negatives(objects):
            negative = clipscore.reword(item["prompt"], objects, other)
            assert negative != item["prompt"] and shapes.phrase(*other[1]) in negative
            wins.append(true > scorer.scores(image, negative)["clip"])
    assert np.mean(wins) >= 0.9, np.mean(wins)


def test_tiny_clip_refuses_another_text_tower(tmp_path):
    other = tmp_path / "other.safetensors"
    save_checkpoint(build_model(tiny(image_size=32)), other)
    with pytest.raises(ValueError, match="trained against text tower"):
        clipscore.ClipScore(checkpoint=other)
    with pytest.raises(FileNotFoundError, match="train it"):
        clipscore.ClipScore(path=tmp_path / "missing.safetensors", checkpoint=DEFAULT_CHECKPOINT)
