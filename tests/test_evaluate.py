"""tools/evaluate.py: the benchmark end to end on a random tiny model (files, rows, table, drift, resuming, a
plugged-in judge), and its small parts (SSIM, target words, swap questions, prompt files)."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from minisd.checkpoint import build_model, save_checkpoint
from minisd.config import tiny
from tools import evaluate, shapes

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
    assert "python -m tools.evaluate --checkpoint" in table and evaluate.file_hash(ckpt) in table
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
    prompts.write_text('{"prompt": "a red circle and a blue square", "objects": [["red", "circle"], ["blue", "square"]]}\n'
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
    found, swap = evaluate.judge_image(judge, image, [("red", "circle"), ("blue", "square")])
    assert found == [True, False] and swap is True
    assert set(asked[2:]) == {("blue", "circle"), ("red", "square")}
    assert evaluate.judge_image(judge, image, [("red", "circle")]) == ([True], None)
    assert evaluate.judge_image(judge, image, None) == (None, None)
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
