"""The command line, `python -m minisd.sample`, on a tiny checkpoint written here: what it writes, what it refuses,
and that every mistake is one line on stderr with exit code 2, not a traceback."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minisd.checkpoint import build_model, save_checkpoint
from minisd.config import tiny
from minisd.sample import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny-model.safetensors"
    save_checkpoint(build_model(tiny(image_size=32)), path)  # 4 latent channels, as TAESD needs
    return path


def sample(ckpt, out, *args, prompt=PROMPT):
    main(["--prompt", prompt, "--checkpoint", str(ckpt), "--steps", "2", "--out", str(out), *args])
    return sorted(Path(out).glob("*.png")) if Path(out).is_dir() else [Path(out)]


def fails(capsys, argv):
    """Run main, expect exit code 2 and exactly one line on stderr; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def parameters(path):
    """Read AUTOMATIC1111's `parameters` chunk: prompt, optional `Negative prompt:` line, `Key: value, ...` line
    (a value with a comma, colon or quote is a JSON string)."""
    text = Image.open(path).text["parameters"]
    lines = text.split("\n")
    negative = next((x[len("Negative prompt: "):] for x in lines[1:-1] if x.startswith("Negative prompt: ")), "")
    pairs = re.findall(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', lines[-1])
    settings = {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}
    return lines[0], negative, settings


def test_png_records_every_setting(ckpt, tmp_path):
    [path] = sample(ckpt, tmp_path / "out", "--negative-prompt", "blurry, grey", "--seed", "3", "--guidance", "6",
                    "--sampler", "ddim", "--height", "32", "--width", "48")
    prompt, negative, s = parameters(path)
    assert (prompt, negative) == (PROMPT, "blurry, grey")
    assert s["Steps"] == "2" and s["Sampler"] == "DDIM" and s["CFG scale"] == "6.0" and s["Seed"] == "3"
    assert s["Size"] == "48x32"                             # A1111 writes width x height
    assert Image.open(path).size == (48, 32)
    assert s["Model hash"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    assert s["Model"] == "tiny-model" and s["Version"].startswith("minisd")


def test_numbered_files_never_overwrite(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00007-99.png").write_bytes(b"not mine")
    (out / "notes.txt").write_text("keep")
    first = set(sample(ckpt, out))
    second = set(sample(ckpt, out, "--seed", "5"))
    assert first - {out / "00007-99.png"} == {out / "00008-0.png"}
    assert second - first == {out / "00009-5.png"}
    assert (out / "00007-99.png").read_bytes() == b"not mine"


def test_existing_png_is_refused_unless_overwrite(ckpt, tmp_path, capsys):
    target = tmp_path / "image.png"
    target.write_bytes(b"keep me")
    # a real process: the exit code and stderr as a shell sees them
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "minisd.sample", "--prompt", PROMPT, "--checkpoint", str(ckpt),
                        "--steps", "2", "--out", str(target)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "exists" in p.stderr and "--overwrite" in p.stderr
    assert target.read_bytes() == b"keep me"
    sample(ckpt, target, "--overwrite")
    assert Image.open(target).size == (32, 32)


@pytest.mark.parametrize("args, says", [
    (["--checkpoint", "{tmp}/nowhere.safetensors"], "checkpoint not found"),
    (["--height", "30"], "multiple of 8"),
    (["--width", "0"], "must be positive"),
    (["--decoder", "taesd"], "--taesd"),
    (["--n", "0"], "--n"),
])
def test_mistakes_are_one_line(ckpt, tmp_path, capsys, args, says):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    line = fails(capsys, ["--prompt", PROMPT, "--checkpoint", str(ckpt), "--steps", "2",
                          "--out", str(tmp_path / "out"), *args])
    assert line.startswith("error:") and says in line
    assert not list(tmp_path.glob("out/*.png"))


def test_n_images_take_consecutive_seeds(ckpt, tmp_path):
    paths = sample(ckpt, tmp_path / "out", "--n", "2", "--seed", "11")
    assert [p.name for p in paths] == ["00000-11.png", "00001-12.png"]
    assert [parameters(p)[2]["Seed"] for p in paths] == ["11", "12"]
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in paths)
    assert np.abs(a - b).max() > 0


def test_regulate_prints_targets_and_records_them(ckpt, tmp_path, capsys):
    [plain] = sample(ckpt, tmp_path / "plain", "--seed", "2")
    capsys.readouterr()
    [path] = sample(ckpt, tmp_path / "regulated", "--seed", "2", "--regulate", "--targets", "circle square")
    out = capsys.readouterr().out
    assert re.search(r"^\s*3\s+circle</w>\s+circle$", out, re.M)   # position, token, word
    assert re.search(r"^\s*7\s+square</w>\s+square$", out, re.M)
    _, _, s = parameters(path)
    assert s["Regulation"] == "Attention Regulation" and s["Regulation targets"] == "circle square"
    assert int(s["Regulation edit steps"]) == 1   # half of 2 steps
    assert "Regulation" not in parameters(plain)[2]
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(path)))


def test_unknown_target_lists_the_prompts_tokens(ckpt, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--prompt", PROMPT, "--checkpoint", str(ckpt), "--steps", "2", "--out", str(tmp_path / "out"),
              "--regulate", "--targets", "circle triangle"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.startswith("error:") and "'triangle'" in err
    assert all(t in err for t in ("circle</w>", "blue</w>", "square</w>"))
    assert not list(tmp_path.glob("out/*.png"))


def test_save_attention_with_and_without_regulation(ckpt, tmp_path, capsys):
    [plain] = sample(ckpt, tmp_path / "a", "--save-attention", str(tmp_path / "maps-a"))
    [reg] = sample(ckpt, tmp_path / "b", "--save-attention", str(tmp_path / "maps-b"), "--regulate",
                   "--targets", "circle")
    out = capsys.readouterr().out
    assert "targets chosen from the prompt: circle square" in out  # no --targets: the prompt's nouns
    grid_plain = Image.open(tmp_path / "maps-a" / f"{plain.stem}-attention.png")
    grid_reg = Image.open(tmp_path / "maps-b" / f"{reg.stem}-attention.png")
    # plain: image + circle + square columns; regulated: (image + circle) plain, then the same regulated
    assert grid_plain.size[0] > 3 * 128 and grid_reg.size[0] > 4 * 128
    assert np.asarray(grid_plain.convert("L")).std() > 10  # something is drawn


def test_taesd_decoder(ckpt, tmp_path, shared_dir):
    weights = shared_dir / "weights" / "taesd" / "taesd_decoder.safetensors"
    if not weights.is_file():
        pytest.skip(f"{weights} is absent")
    [path] = sample(ckpt, tmp_path / "out", "--decoder", "taesd", "--taesd", str(weights))
    assert parameters(path)[2]["Decoder"] == "taesd"
    # TAESD upsamples 8x; this tiny model's VAE only 2x, so the picture is 4x the requested size
    assert Image.open(path).size == (32 // 2 * 8,) * 2


def test_help_mentions_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")]
    assert len(flags) > 20
    assert [f for f in flags if f not in text] == []


@pytest.mark.parametrize("method, extra, says", [
    ("syngen", [], "SynGen pair: red -> circle"),
    ("composable", [], None),
    ("dense", ["--layout", "red circle:0.05,0.05,0.5,0.5;blue square:0.5,0.5,0.95,0.95"], None),
])
def test_the_papers_other_methods_on_the_shipped_model(tmp_path, capsys, method, extra, says):
    """`--method syngen`, `composable` and `dense --layout` on the shipped model: each writes its image, records
    the method, and differs from the plain image of the same seed."""
    from minisd.sample import DEFAULT_CHECKPOINT
    from regulation.editors import METHODS
    base = ["--prompt", "a red circle and a blue square", "--checkpoint", str(DEFAULT_CHECKPOINT), "--steps", "4"]
    main(base + ["--out", str(tmp_path / "plain.png")])
    main(base + ["--out", str(tmp_path / "m.png"), "--method", method, *extra])
    image = Image.open(tmp_path / "m.png")
    assert f"Regulation: {METHODS[method].title}" in image.text["parameters"]
    assert np.abs(np.asarray(image, float) - np.asarray(Image.open(tmp_path / "plain.png"), float)).max() > 0
    if says:
        assert says in capsys.readouterr().out


@pytest.mark.parametrize("method, extra, records", [
    ("composable", ["--concept-weights", "5 | -3"], "Regulation concept weights: 5 | -3"),
    ("composable", ["--strength", "2.5"], "Regulation concept weights: 2.5 | 2.5"),
    ("dense", ["--layout", "red circle:0.05,0.05,0.5,0.5;blue square:0.5,0.5,0.95,0.95", "--layout-background",
               "none"], "Regulation layout background: none"),
    ("dense", ["--layout", "red circle:0.05,0.05,0.5,0.5;blue square:0.5,0.5,0.95,0.95", "--strength", "0.5"],
     "Regulation creg/sreg scale: 0.5"),
    ("syngen", ["--strength", "5"], "Regulation step size: 5"),
    ("attend-excite", ["--strength", "5"], "Regulation step size: 5"),
])
def test_method_options_change_the_image_and_are_recorded(tmp_path, method, extra, records):
    """--concept-weights (the authors' "7.5 | -5"), --strength (each method's knob) and --layout-background: each
    is recorded in the PNG and gives another image than the method's defaults from the same seed."""
    from minisd.sample import DEFAULT_CHECKPOINT
    base = ["--prompt", "a red circle | a blue square" if method == "composable" else "a red circle and a blue square",
            "--checkpoint", str(DEFAULT_CHECKPOINT), "--steps", "4", "--method", method]
    base += extra[:2] if method == "dense" else []
    main(base + ["--out", str(tmp_path / "default.png")])
    main(base + [*extra[2 if method == "dense" else 0:], "--out", str(tmp_path / "knob.png")])
    knob = Image.open(tmp_path / "knob.png")
    assert records in knob.text["parameters"]
    assert records not in Image.open(tmp_path / "default.png").text["parameters"]
    assert np.abs(np.asarray(knob, float) - np.asarray(Image.open(tmp_path / "default.png"), float)).max() > 0
