"""tools/eval/evaluate.py: the benchmark end to end on a random tiny model (files, rows, table, drift, resuming, a
plugged-in judge), and its small parts (SSIM, target words, swap questions, prompt files)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from minisd.checkpoint import build_model, save_checkpoint
from minisd.config import tiny
from tools.eval import evaluate
from tools.testbed import judge, shapes

QUICK = ["--limit", "2", "--seeds", "1", "--steps", "4", "--methods", "plain,regulate", "--threads", "1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(build_model(tiny(image_size=32)), path)
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_writes_rows_table_and_examples_and_resumes(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", str(ckpt), "--out", str(out), *QUICK])
    assert all((out / name).is_file() for name in ("results.csv", "table.md", "examples.png"))

    rows = read_csv(out / "results.csv")
    items = shapes.benchmark_prompts(2)
    assert sorted((r["prompt"], r["seed"], r["method"]) for r in rows) == \
        sorted((d["prompt"], "0", m) for d in items for m in ("plain", "regulate[nouns]"))
    for r in rows:
        objects = next(d["objects"] for d in items if d["prompt"] == r["prompt"])
        assert json.loads(r["objects"]) == objects and len(r["found"].split()) == 2
        if r["method"] == "plain":
            assert r["targets"] == "" and float(r["mad"]) == 0 and float(r["ssim"]) == pytest.approx(1.0)
        else:   # the nouns of the prompt are regulated, and the editor did change the image
            assert r["targets"] == " ".join(s for _, s in objects) and float(r["mad"]) > 0
        assert float(r["seconds"]) > 0

    table = (out / "table.md").read_text()
    assert "python -m tools.eval --checkpoint" in table and evaluate.file_hash(ckpt) in table
    assert "| plain | 2 |" in table and "| regulate[nouns] | 2 |" in table
    assert "| regulate[nouns] | 2 |" in capsys.readouterr().out

    # the same command again finds every row done and generates nothing
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("a finished row was generated again"))
    evaluate.main(["--checkpoint", str(ckpt), "--out", str(out), *QUICK])
    assert len(read_csv(out / "results.csv")) == 4
    # other settings must not mix into the same results
    with pytest.raises(SystemExit, match="other settings"):
        evaluate.main(["--checkpoint", str(ckpt), "--out", str(out), *QUICK, "--guidance", "2"])


JUDGE = '''
calls = []

class AllPresent:
    """Says that every object it is asked about is in the image."""
    def __call__(self, image, objects):
        calls.append((image.shape, image.dtype, list(objects)))
        return [True] * len(objects)
'''


def test_a_plugged_in_judge_is_used(ckpt, tmp_path, monkeypatch):
    (tmp_path / "all_present.py").write_text(JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle and a blue square", '
                       '"objects": [["red", "circle"], ["blue", "square"]]}\n'
                       '{"prompt": "a photo of a green heart", "objects": ["green heart"]}\n')
    summary = evaluate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "eval"), "--prompts", str(prompts),
                             "--judge", "all_present:AllPresent", *QUICK])
    import all_present
    assert all_present.calls and all_present.calls[0][:2] == ((32, 32, 3), np.uint8)
    for m in ("plain", "regulate[nouns]"):
        assert summary[m]["detection"] == 1.0 and summary[m]["recall"] == 1.0
        assert summary[m]["binding"] == 0.0   # it also says yes to the swapped "blue circle", "red square"
    assert "| regulate[nouns] | 2 | 100.0% | 100.0% | 0.0% | +0 / -0 |" in (tmp_path / "eval" / "table.md").read_text()
    rows = read_csv(tmp_path / "eval" / "results.csv")
    assert {r["targets"] for r in rows if r["method"] != "plain"} == {"circle square", "heart"}


def test_ssim_and_drift():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32))
    assert evaluate.ssim(a, a) == pytest.approx(1.0)
    assert evaluate.ssim(a, 0.5 * a + 0.25) < evaluate.ssim(a, 0.9 * a + 0.05) < 1.0
    assert evaluate.ssim(a, rng.random((32, 32))) < 0.2
    img = Image.fromarray((255 * rng.random((16, 16, 3))).astype(np.uint8))
    black = Image.new("RGB", (16, 16))
    assert evaluate.drift(img, img) == (0.0, pytest.approx(1.0))
    assert evaluate.drift(img, black)[0] == pytest.approx(np.asarray(img).mean() / 255)


def test_target_words():
    item = dict(prompt="a red circle and a red square", objects=[("red", "circle"), ("red", "square")])
    assert evaluate.target_words(item, "nouns") == ["circle", "square"]
    assert evaluate.target_words(item, "attr+nouns") == ["red", "circle", "red#2", "square"]
    unknown = dict(prompt="a photo of a fluffy cat next to a brown dog", objects=None)
    assert evaluate.target_words(unknown, "nouns") == ["cat", "dog"]
    assert evaluate.target_words(unknown, "attr+nouns") == ["fluffy", "cat", "brown", "dog"]


def test_judge_is_asked_about_swapped_attributes():
    asked = []

    def judge(image, objects):
        asked.extend(objects)
        return [o in {("red", "circle"), ("blue", "circle")} for o in objects]
    image = Image.new("RGB", (8, 8))
    found, swap, types = evaluate.judge_image(judge, image, [("red", "circle"), ("blue", "square")])
    assert found == [True, False] and swap is True and types is None   # this judge reports no failure types
    assert set(asked[2:]) == {("blue", "circle"), ("red", "square")}
    assert evaluate.judge_image(judge, image, [("red", "circle")]) == ([True], None, None)
    assert evaluate.judge_image(judge, image, None) == (None, None, None)
    with pytest.raises(ValueError, match="answers"):
        evaluate.judge_image(lambda i, o: [True], image, [("red", "circle"), ("blue", "square")])


def test_prompt_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("# a comment\na cat and a dog\n\na red car\n")
    assert evaluate.load_prompts(text) == [dict(prompt="a cat and a dog", objects=None),
                                           dict(prompt="a red car", objects=None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"objects": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        evaluate.load_prompts(bad)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        evaluate.parse_variants("plain,magic", "nouns")
    assert [v.name for v in evaluate.parse_variants("regulate", "both")] == \
        ["plain", "regulate[nouns]", "regulate[attr+nouns]"]


def test_the_attend_and_excite_prompt_set_ships_with_its_targets(capsys):
    items = evaluate.load_prompts("ae")
    assert len(items) == 276 and len({d["prompt"] for d in items}) == 276
    assert items[0]["prompt"] == "a elephant and a rabbit"          # the original wording and order
    for d in items:
        subjects = [o if isinstance(o, str) else o[-1] for o in d["objects"]]
        assert len(subjects) == 2 and evaluate.target_words(d, "nouns") == subjects
        words = d["prompt"].split()
        assert words[-1] == subjects[1] and subjects[0] in words[1:3]
    # the three sets in the source's order and sizes (66, 144, 66): animals bare, objects with their colour
    coloured = [tuple(isinstance(o, tuple) for o in d["objects"]) for d in items]
    assert set(coloured[:66]) == {(False, False)} and set(coloured[210:]) == {(True, True)}
    assert set(coloured[66:210]) == {(False, False), (False, True)}     # "a cat with a crown", "a cat and a red car"
    data = evaluate.PROMPT_SETS["ae"]
    assert "MIT" in data.read_text()[:2000] and (data.parent / "LICENSE-attend-and-excite.txt").is_file()
    assert "/shared" not in str(data.resolve())
    listed = evaluate.main(["--prompts", "ae", "--list-prompts"])
    lines = capsys.readouterr().out.splitlines()
    assert len(listed) == len(lines) == 276
    assert lines[70] == "70\ta frog and a purple balloon\tfrog; purple balloon\tfrog balloon"


def test_jsonl_targets_are_used_as_given(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a photo of a cat on a red sofa", "targets": ["cat", "sofa"]}\n{"prompt": "a dog"}\n')
    items = evaluate.load_prompts(p)
    assert items == [dict(prompt="a photo of a cat on a red sofa", objects=None, targets=["cat", "sofa"]),
                     dict(prompt="a dog", objects=None)]
    assert evaluate.target_words(items[0], "attr+nouns") == ["cat", "sofa"]
    p.write_text('{"prompt": "a cat", "targets": "cat"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        evaluate.load_prompts(p)
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate.load_prompts(tmp_path / "absent.txt")


@pytest.mark.parametrize("layers", [None, "input_blocks.1", "16x16"])
def test_example_maps_come_from_the_regulated_layers(ckpt, layers):
    """examples.png shows the maps of the layers that were regulated: with --layers, those, not the defaults."""
    from minisd.attention import Attention
    from minisd.blocks import block_of
    from minisd.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(ckpt)
    item = dict(prompt="a red circle and a blue square", objects=[("red", "circle"), ("blue", "square")])
    s = evaluate.Settings(steps=4, guidance=5.0, size=32, layers=layers)
    unit = evaluate.evaluate_one(pipe, item, 0, evaluate.parse_variants("regulate", "nouns"), None, s, want_maps=True)
    words, maps, seen = unit.maps["regulate[nouns]"]
    cross = [m.name for m in pipe.model.modules() if isinstance(m, Attention) and m.is_cross]
    if layers == "16x16":   # the 32 px model's 16x16 maps are its first level: input_blocks.1, output_blocks.4/5
        expected = [n for n in cross if block_of(n) in ("input_blocks.1", "output_blocks.4", "output_blocks.5")]
    else:
        expected = [n for n in cross if block_of(n) in ([layers] if layers else pipe.cfg.default_blocks())]
    assert words == ["circle", "square"] and seen == sorted(expected) and seen
    assert maps[1].shape[0] == 2                      # step steps // 4, one map per target word
    sheet = evaluate.examples_sheet([unit])
    assert sheet.width > 0


def _rows(plain, method, types=None):
    """CSV-like rows: plain[i][s], method[i][s] = all_found of prompt i, seed s; types(name, i, s) -> the
    failure-type dict of that image, or None."""
    rows = []
    for i, (ps, ms) in enumerate(zip(plain, method)):
        for s, (p, m) in enumerate(zip(ps, ms)):
            for name, v in (("plain", p), ("regulate", m)):
                t = types(name, i, s) if types else None
                rows.append(dict(prompt=f"p{i}", seed=str(s), method=name, all_found=str(v), recall=str(v), swap="",
                                 types=json.dumps(t) if t else "", mad="0", ssim="1", seconds="1", scores=""))
    return rows


def test_failure_types_lead_the_table_with_presence():
    """With a judge that reports failure types, the table leads with presence and its interval, then strict;
    each type is a share of the images. Here plain has every shape in half its images, the method in all, and
    the method's images are strict in none: presence +50 points, strict -50."""
    plain = [[1, 1] if i % 2 else [0, 0] for i in range(20)]

    def types(name, i, s):
        ok = name == "regulate" or i % 2 == 1
        return dict(presence=int(ok), strict=int(name == "plain" and ok), omission=int(not ok), wrong_shape=0,
                    colour_swap=int(name == "regulate"), wrong_colour=0, extra=0)
    summary = evaluate.summarise(_rows(plain, [[0, 0]] * 20, types), ["plain", "regulate"])
    share, (d, lo, hi), fixed, broke = summary["regulate"]["types"]["presence"]
    assert share == 1.0 and d == pytest.approx(50.0) and lo > 0 and (fixed, broke) == (20, 0)
    share, (d, lo, hi), fixed, broke = summary["regulate"]["types"]["strict"]
    assert share == 0.0 and d == pytest.approx(-50.0) and hi < 0 and (fixed, broke) == (0, 20)
    assert summary["plain"]["types"]["omission"][0] == 0.5 and summary["regulate"]["types"]["colour_swap"][0] == 1.0
    table = evaluate.format_table(summary)
    header = table.splitlines()[0]
    assert header.index("presence") < header.index("strict") < header.index("omission") < header.index("colour swap")
    assert "| regulate | 40 | 100.0% | +50.0 [" in table and "+20 / -0" in table and "+0 / -20" in table
    # a judge without failure types keeps the detection table
    assert "| detection |" in evaluate.format_table(evaluate.summarise(_rows(plain, plain), ["plain", "regulate"]))


def test_paired_bootstrap_interval_over_prompts():
    # half the prompts fixed on both seeds, half unchanged: +50 points, an interval around it that excludes 0
    plain = [[0, 0] if i % 2 else [1, 1] for i in range(40)]
    summary = evaluate.summarise(_rows(plain, [[1, 1]] * 40), ["plain", "regulate"])
    diff, lo, hi = summary["regulate"]["ci"]
    assert diff == pytest.approx(50.0) and 30 < lo < 50 < hi < 70
    assert summary["plain"]["ci"] is None
    assert "+50.0 [" in evaluate.format_table(summary)
    # the same images: no difference, a zero-width interval
    assert evaluate.summarise(_rows(plain, plain), ["plain", "regulate"])["regulate"]["ci"] == (0.0, 0.0, 0.0)
    # per-prompt pairing: one prompt's seeds disagreeing both ways average to 0 for that prompt
    d, lo, hi = evaluate.paired_ci([("a", 0, 1), ("a", 1, 0), ("b", 0, 0)])
    assert (d, lo, hi) == (0.0, 0.0, 0.0)


def test_every_method_of_the_paper_table_runs(ckpt, tmp_path):
    """plain and the five methods on one prompt: SynGen with its parsed pairs, DenseDiffusion with the renderer's
    layout (a mask per object, seeded by prompt and seed), Composable Diffusion with one concept per object."""
    variants = evaluate.parse_variants("plain,regulate,attend-excite,syngen,dense,composable", "nouns")
    assert [v.name for v in variants] == ["plain", "regulate[nouns]", "attend-excite[nouns]", "syngen",
                                          "dense[layout given]", "composable"]
    item = dict(prompt="a red circle above a blue square", objects=[("red", "circle"), ("blue", "square")])
    assert evaluate.concepts(item) == "a red circle | a blue square"
    layout = evaluate.renderer_layout(item, 3, 64)
    assert [p for p, _ in layout] == ["red circle", "blue square"] and layout[0][1].shape == (64, 64)
    assert all(0 < m.mean() < 0.5 for _, m in layout)
    assert torch.equal(layout[1][1], evaluate.renderer_layout(item, 3, 64)[1][1])
    assert not torch.equal(layout[1][1], evaluate.renderer_layout(item, 4, 64)[1][1])
    with pytest.raises(ValueError, match="layout"):
        evaluate.renderer_layout(dict(prompt="a cat", objects=["cat"]), 0, 64)
    out = tmp_path / "all"
    evaluate.main(["--checkpoint", str(ckpt), "--out", str(out), "--limit", "1", "--seeds", "1", "--steps", "3",
                   "--methods", "plain,regulate,attend-excite,syngen,dense,composable", "--threads", "1"])
    rows = read_csv(out / "results.csv")
    assert [r["method"] for r in rows] == [v.name for v in variants]
    assert all(float(r["mad"]) > 0 for r in rows[1:])   # every method changed the image
    assert all(set(json.loads(r["types"])) == set(judge.FAILURE_TYPES) for r in rows)


def test_syngen_without_a_modifier_leaves_the_image_as_plain(ckpt, tmp_path):
    """A prompt with no modifier (Attend-and-Excite's "a dog and a frog"): the authors' SynGen has a zero loss and
    does nothing; the benchmark records the plain image for it instead of stopping."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a dog and a frog", "targets": ["dog", "frog"]}\n')
    out = tmp_path / "syn"
    evaluate.main(["--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--seeds", "1",
                   "--steps", "3", "--methods", "plain,syngen", "--threads", "1"])
    rows = read_csv(out / "results.csv")
    assert [r["method"] for r in rows] == ["plain", "syngen"]
    assert float(rows[1]["mad"]) == 0 and rows[1]["targets"] == ""
