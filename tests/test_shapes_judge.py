"""The shapes world (tools/testbed/shapes.py) and its judge (tools/testbed/judge.py)."""
import json
import re
from collections import Counter

import numpy as np
import pytest

from tools.testbed import judge, shapes

PHRASE = re.compile(r"\b(?:a|an) (%s) (%s)\b" % ("|".join(shapes.COLOURS), "|".join(shapes.SHAPES)))


def named(text):
    return Counter(PHRASE.findall(text))


def test_training_examples_are_reproducible_from_the_seed():
    a = [shapes.training_example(np.random.default_rng(7)) for _ in range(2)]
    b = shapes.training_example(np.random.default_rng(8))
    assert np.array_equal(a[0][0], a[1][0]) and a[0][1:] == a[1][1:]
    assert not np.array_equal(a[0][0], b[0])
    assert a[0][0].shape == (128, 128, 3) and a[0][0].dtype == np.uint8


def test_held_out_pairs_are_fixed_and_well_formed():
    pairs = shapes.held_out_pairs()
    assert pairs == shapes.held_out_pairs()
    assert len(pairs) >= 120 and len({frozenset(p) for p in pairs}) == len(pairs)
    for (c1, s1), (c2, s2) in pairs:
        assert c1 != c2 and s1 != s2
    # every object is held out with some partners and keeps others for training
    counts = Counter(o for p in pairs for o in p)
    assert len(counts) == len(shapes.COLOURS) * len(shapes.SHAPES)
    assert max(counts.values()) < len(shapes.COLOURS) * len(shapes.SHAPES) // 2


def test_training_scenes_never_show_a_held_out_pair():
    held = {frozenset(p) for p in shapes.held_out_pairs()}
    rng = np.random.default_rng(0)
    n_by_count = Counter()
    for _ in range(3000):
        scene = shapes.sample_scene(rng)
        keys = [o.key for o in scene.objects]
        n_by_count[len(keys)] += 1
        assert len(set(keys)) == len(keys)
        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                assert frozenset((keys[i], keys[j])) not in held
    assert set(n_by_count) == {1, 2, 3}


def test_objects_do_not_overlap_and_stay_inside():
    rng = np.random.default_rng(1)
    for _ in range(300):
        objs = shapes.sample_scene(rng, n_objects=3).objects
        for o in objs:
            assert 28 / 128 - 1e-6 <= o.size <= 52 / 128 + 1e-6
            assert o.size / 2 <= o.cx <= 1 - o.size / 2 and o.size / 2 <= o.cy <= 1 - o.size / 2
        for a in objs:
            for b in objs:
                if a is not b:
                    assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= (a.size + b.size) / 2


def test_captions_name_exactly_the_objects():
    rng = np.random.default_rng(2)
    templates = set()
    for _ in range(300):
        image, text, objects = shapes.training_example(rng, size=32)
        assert named(text) == Counter(objects), text
        templates.add(re.sub(PHRASE, "X", text))
    assert len(templates) >= 6  # several templates are in use
    assert shapes.phrase("orange", "star") == "an orange star"


def test_benchmark_prompts_use_only_held_out_pairs(tmp_path):
    held = {frozenset(p) for p in shapes.held_out_pairs()}
    prompts = shapes.benchmark_prompts(120, seed=0)
    assert len(prompts) == 120 and prompts == shapes.benchmark_prompts(120, seed=0)
    for p in prompts:
        objects = [tuple(o) for o in p["objects"]]
        assert frozenset(objects) in held
        assert PHRASE.findall(p["prompt"]) == objects  # named in the listed order
    assert len({frozenset(tuple(o) for o in p["objects"]) for p in prompts}) == 120  # no pair twice
    out = tmp_path / "prompts.jsonl"
    shapes.main(["prompts", "--n", "10", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == shapes.benchmark_prompts(10, seed=0)


def test_render_size_and_bad_input():
    scene = shapes.Scene([shapes.Obj("red", "circle", 0.3, 0.5, 0.5)])
    assert shapes.render(scene, 64).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.render(shapes.Scene([shapes.Obj("pink", "circle", 0.3, 0.5, 0.5)]))
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.render(shapes.Scene([shapes.Obj("red", "blob", 0.3, 0.5, 0.5)]))
    with pytest.raises(ValueError, match="n_objects"):
        shapes.sample_scene(np.random.default_rng(0), n_objects=4)


def test_judge_finds_objects_in_fresh_scenes():
    # seed far from the training seeds; held-out pairs allowed, as the benchmark renders them
    r = judge.measure(n=200, seed=99_000)
    assert r["objects"] > 300
    assert r["accuracy"] >= 0.95, r
    assert r["false_positive_rate"] <= 0.02, r


def test_judge_says_absent_for_objects_not_drawn():
    blank = shapes.render(shapes.Scene([], background="beige"))
    assert judge.detect(blank) == []
    everything = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    assert not any(judge.judge(blank, everything))
    rng = np.random.default_rng(3)
    for shape in shapes.SHAPES:
        scene = shapes.sample_scene(rng, keys=[("green", shape)])
        verdict = judge.judge(shapes.render(scene), everything)
        assert [o for o, v in zip(everything, verdict) if v] == [("green", shape)]


def test_binding_report():
    scene = shapes.Scene([shapes.Obj("red", "circle", 0.35, 0.3, 0.3), shapes.Obj("blue", "square", 0.35, 0.7, 0.7)])
    image = shapes.render(scene)
    red_circle, blue_circle, yellow_star = judge.check_binding(image, [("red", "circle"), ("blue", "circle"),
                                                                        ("yellow", "star")])
    assert red_circle.present and not red_circle.shape_other_colour and not red_circle.colour_other_shape
    # a blue circle is absent, but its shape shows in red and its colour on the square: a binding error
    assert not blue_circle.present and blue_circle.shape_other_colour and blue_circle.colour_other_shape
    assert not (yellow_star.present or yellow_star.shape_other_colour or yellow_star.colour_other_shape)


def test_judge_plugin_and_bad_input():
    j: judge.Judge = judge.ShapesJudge()
    image = shapes.render(shapes.Scene([shapes.Obj("purple", "heart", 0.4, 0.5, 0.5)]))
    assert j(image, [("purple", "heart"), ("purple", "star")]) == [True, False]
    with pytest.raises(ValueError, match="unknown object"):
        j(image, [("pink", "heart")])
    with pytest.raises(ValueError, match="uint8"):
        judge.detect(image.astype(np.float32))


def test_failure_types_on_rendered_scenes():
    """Each failure type on a scene built to show it, for "a red circle and a blue square"."""
    asked = [("red", "circle"), ("blue", "square")]

    def types(*objs):
        scene = shapes.Scene([shapes.Obj(c, s, 0.25, x, y) for c, s, x, y in objs])
        found = judge.failure_types(shapes.render(scene, 128), asked)
        return {k for k, v in found.items() if v}
    assert types(("red", "circle", .3, .3), ("blue", "square", .7, .7)) == {"presence", "strict"}
    assert types(("red", "circle", .3, .3)) == {"omission"}
    assert types(("red", "circle", .3, .3), ("blue", "circle", .7, .7)) == {"wrong_shape"}   # a shape twice
    assert types(("blue", "circle", .3, .3), ("red", "square", .7, .7)) == {"presence", "colour_swap"}
    assert types(("green", "circle", .3, .3), ("blue", "square", .7, .7)) == {"presence", "wrong_colour"}
    assert types(("red", "circle", .25, .25), ("blue", "square", .75, .75), ("green", "star", .25, .75)) == \
        {"presence", "strict", "extra"}
    # presence counts shapes: two circles named, one drawn, is not presence
    two = judge.failure_types(shapes.render(shapes.Scene([shapes.Obj("red", "circle", .25, .3, .3),
                                                          shapes.Obj("blue", "square", .25, .7, .7)]), 128),
                              [("red", "circle"), ("blue", "circle")])
    assert not two["presence"] and two["wrong_shape"]
    assert set(judge.ShapesJudge().failures(np.zeros((64, 64, 3), np.uint8), asked)) == set(judge.FAILURE_TYPES)
