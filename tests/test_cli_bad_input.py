"""Bad input to `python -m minisd.sample`, as a new user gives it: every mistake that can be known before sampling
is one `error:` line on stderr with exit status 2, no traceback, nothing written and no model call; Ctrl-C is one
line and status 130; options never silently do nothing; a run that overflows stops at the step it happened."""
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minisd.generate
import minisd.pipeline
import minisd.sample
from minisd.checkpoint import build_model, save_checkpoint
from minisd.config import tiny
from minisd.sample import DEFAULT_CHECKPOINT, build_parser, main

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-bad") / "tiny-model.safetensors"
    save_checkpoint(build_model(tiny(image_size=32)), path)   # size unit: VAE 2 x 2^2 = 8
    return path


def call(capsys, argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, argv):
    """Exit status 2, exactly one `error:` line (warnings may come before it), no traceback; return the line."""
    code, out, err = call(capsys, argv)
    assert code == 2, err
    assert "Traceback" not in err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and all(x.startswith(("error:", "warning:")) for x in err.splitlines()), err
    return errors[0]


@pytest.fixture
def no_sampling(monkeypatch):
    """A model call would be a generation computed for nothing: make it fail the test."""
    def forbidden(*a, **kw):
        raise AssertionError("sampling started")
    monkeypatch.setattr(minisd.pipeline.Pipeline, "__call__", forbidden)


def argv(ckpt, out, *args, prompt=PROMPT):
    return ["--prompt", prompt, "--checkpoint", str(ckpt), "--steps", "2", "--out", str(out), *args]


def files(folder):
    return sorted(p.relative_to(folder) for p in Path(folder).rglob("*"))


# --- 1. outputs are checked before any work ---------------------------------------------------------------------

def test_unwritable_out_is_refused_before_sampling(ckpt, tmp_path, capsys, no_sampling):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    line = refused(capsys, argv(ckpt, blocker / "x.png"))
    assert "is a file" in line
    line = refused(capsys, argv(ckpt, blocker / "sub" / "folder"))
    assert "is a file" in line
    if sys.platform.startswith("linux") and Path("/proc").is_dir():   # not writable even by root
        line = refused(capsys, argv(ckpt, "/proc/minisd-test/x.png"))
        assert "cannot write in /proc" in line
    assert files(tmp_path) == [Path("notes.txt")]


def test_save_attention_conflicts_are_refused_before_sampling(ckpt, tmp_path, capsys, no_sampling):
    taken = tmp_path / "maps"
    taken.write_text("mine")
    line = refused(capsys, argv(ckpt, tmp_path / "out", "--save-attention", str(taken)))
    assert "--save-attention" in line and "is a file" in line
    # a grid of that name exists already (from a run into another --out folder, numbered the same)
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids" / "00000-0-attention.png").write_bytes(b"old grid")
    line = refused(capsys, argv(ckpt, tmp_path / "out", "--save-attention", str(tmp_path / "grids")))
    assert "00000-0-attention.png exists" in line and "--overwrite" in line
    assert (tmp_path / "grids" / "00000-0-attention.png").read_bytes() == b"old grid"
    assert not (tmp_path / "out").exists()


def test_out_by_extension(ckpt, tmp_path, capsys):
    for name, fmt in (("pic.jpg", "JPEG"), ("pic.webp", "WEBP"), ("pic.png", "PNG")):
        code, _, err = call(capsys, argv(ckpt, tmp_path / name, "--seed", "4"))
        assert code == 0, err
        path = tmp_path / name
        assert path.is_file(), f"{path} is not a file"
        im = Image.open(path)
        assert im.format == fmt and im.size == (32, 32)
        if fmt == "PNG":
            text = im.text["parameters"]
        else:   # where AUTOMATIC1111 writes it: EXIF UserComment, "UNICODE\0" + UTF-16
            raw = im.getexif().get_ifd(0x8769)[0x9286]
            assert raw.startswith(b"UNICODE\0")
            text = raw[8:].decode("utf-16-be")
        assert text.startswith(PROMPT) and "Seed: 4" in text
    line = refused(capsys, argv(ckpt, tmp_path / "pic.gif"))
    assert ".gif" in line and ".jpg" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pic.jpg", "pic.png", "pic.webp"]   # no part files


# --- 2. devices, Ctrl-C, pickles, sizes the machine cannot hold ------------------------------------------------

@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps", "banana"])
def test_unavailable_device_is_one_line(ckpt, tmp_path, capsys, no_sampling, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    line = refused(capsys, argv(ckpt, tmp_path / "out", "--device", device))
    assert "--device" in line and "cpu" in line
    assert not (tmp_path / "out").exists()


def interrupt_on_call(monkeypatch, on):
    real, calls = minisd.pipeline.Pipeline.__call__, []

    def call_(self, *a, **kw):
        calls.append(1)
        if len(calls) == on:
            raise KeyboardInterrupt
        return real(self, *a, **kw)
    monkeypatch.setattr(minisd.pipeline.Pipeline, "__call__", call_)


def test_ctrl_c_is_one_line_and_leaves_no_empty_folder(ckpt, tmp_path, capsys, monkeypatch):
    interrupt_on_call(monkeypatch, on=1)
    code, _, err = call(capsys, argv(ckpt, tmp_path / "new" / "out", "--save-attention", str(tmp_path / "maps")))
    assert code == 130 and err == "interrupted\n"
    assert files(tmp_path) == []


def test_ctrl_c_keeps_finished_images_only(ckpt, tmp_path, capsys, monkeypatch):
    interrupt_on_call(monkeypatch, on=2)
    code, _, err = call(capsys, argv(ckpt, tmp_path / "out", "--n", "3"))
    assert code == 130 and err == "interrupted\n"
    assert files(tmp_path) == [Path("out"), Path("out/00000-0.png")]


def test_ctrl_c_while_writing_leaves_no_partial_file(ckpt, tmp_path, capsys, monkeypatch):
    real = Image.Image.save

    def save(self, fp, *a, **kw):
        Path(fp).write_bytes(b"half an image")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", save)
    code, _, err = call(capsys, argv(ckpt, tmp_path / "out"))
    monkeypatch.setattr(Image.Image, "save", real)
    assert code == 130 and err == "interrupted\n"
    assert files(tmp_path) == []


def test_malicious_pickle_is_one_clean_line(ckpt, tmp_path, capsys, no_sampling):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Evil()}, path)
    line = refused(capsys, argv(path, tmp_path / "out", "--allow-pickle"))
    assert "refused" in line and "system" in line
    assert "weights_only` set to `False` will likely succeed" not in line   # torch's advice is not ours to give
    assert not (tmp_path / "out").exists()


def test_size_above_the_machine_is_refused_and_far_above_the_model_warned(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(minisd.generate, "available_memory", lambda device: 1 << 20)   # 1 MiB left
    with monkeypatch.context() as m:
        m.setattr(minisd.pipeline.Pipeline, "__call__", lambda *a, **kw: pytest.fail("sampling started"))
        line = refused(capsys, argv(ckpt, tmp_path / "out", "--height", "256", "--width", "256"))
    assert "256x256 needs about" in line and "GiB" in line and "smaller size" in line
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(minisd.generate, "available_memory", lambda device: None)   # unknown: warn only
    code, _, err = call(capsys, argv(ckpt, tmp_path / "out", "--height", "160", "--width", "160", "--steps", "1"))
    assert code == 0, err
    assert re.fullmatch(r"warning: 160x160 is 25x the pixels of this model's 32x32: .*\n", err)


def test_memory_estimate_grows_with_the_pixels():
    from minisd.config import sd1
    from minisd.generate import estimate_memory
    small, big = (estimate_memory(sd1(), s, s, torch.float32, 2) for s in (512, 4096))
    assert 0.1 * 2 ** 30 < small < 4 * 2 ** 30      # SD 1.5 at 512 px runs in a few GiB
    assert big > 20 * 2 ** 30 and big / small >= 60     # 64x the pixels


# --- 3. options that would silently do nothing ------------------------------------------------------------------

@pytest.mark.parametrize("layers", ["32x32", "7x7", "16x16 7"])
def test_regulate_layers_size_the_model_lacks(ckpt, tmp_path, capsys, no_sampling, layers):
    line = refused(capsys, argv(ckpt, tmp_path / "out", "--regulate", "--regulate-layers", layers))
    bad = [x for x in layers.split() if x != "16x16"][0]
    assert f"--regulate-layers {bad}" in line
    # the sizes it has at 32 px (latent 16: maps 16, 8, 4) with their blocks
    assert "16x16 (input_blocks.1" in line and "8x8 (" in line and "4x4 (" in line and "middle_block" in line


@pytest.mark.parametrize("args, says", [
    (["--edit-steps", "1"], "--regulate or --method; add one"),
    (["--targets", "circle"], "--regulate, --method or --save-attention"),
    (["--regulate-layers", "8x8"], "--regulate, --method or --save-attention"),
    (["--layout", "circle:0,0,1,1"], "add --method dense"),
    (["--method", "dense"], "needs a layout"),
    (["--method", "dense", "--layout", "circle:0,0,1,1", "--backend", "inductor"], "use --backend eager"),
    (["--method", "composable", "--save-attention", "maps"], "no maps to show"),
    (["--method", "composable", "--edit-steps", "1"], "does not take --edit-steps"),
    (["--method", "syngen", "--layout", "circle:0,0,1,1"], "add --method dense"),
    (["--regulate", "--edit-steps", "-1"], "between 0 and --steps"),
    (["--regulate", "--edit-steps", "3"], "between 0 and --steps (2)"),
    (["--method", "composable", "--prompt", "a red circle | a blue square", "--concept-weights", "7.5 | x"],
     'concept weights must be numbers separated by "|"'),
    (["--method", "composable", "--prompt", "a red circle | a blue square", "--concept-weights", "1 | 2 | 3"],
     "3 concept weights for 2 concepts"),
    (["--concept-weights", "1 | 2"], "add --method composable"),
    (["--method", "composable", "--strength", "2", "--concept-weights", "1 | 2"], "not both"),
    (["--layout-background", "none"], "add --method dense"),
    (["--regulate", "--strength", "2"], "knob is --edit-steps"),
    (["--method", "syngen", "--strength", "nan"], "--strength must be a finite number"),
    (["--method", "attend-excite", "--targets", "circle", "--strength", "-1"], ">= 0"),
    (["--guidance", "nan"], "finite"),
    (["--guidance", "inf"], "finite"),
    (["--guidance", "-1"], ">= 0"),
    (["--eta", "nan"], "--eta"),
    (["--seed", "-1"], "--seed must be between 0"),
    (["--seed", str(2 ** 70)], "--seed must be between 0"),
    (["--negative-prompt", "blurry", "--guidance", "1"], "turns off"),
    (["--height", "30"], "multiple of 8"),
    (["--width", "0"], "positive"),
])
def test_options_that_would_do_nothing_are_refused(ckpt, tmp_path, capsys, no_sampling, args, says):
    line = refused(capsys, argv(ckpt, tmp_path / "out", *args))
    assert says in line, line
    assert not (tmp_path / "out").exists()


def parameters(path):
    return dict(re.findall(r"([\w][\w \-/]*): ([^,]*)(?:,|$)", Image.open(path).text["parameters"].split("\n")[-1]))


@pytest.mark.parametrize("method, edit, recorded", [("regulate", None, "1"), ("regulate", "2", "2"),
                                                    ("regulate", "0", "0"), ("attend-excite", None, "2")])
def test_edit_steps_are_recorded_as_used(ckpt, tmp_path, capsys, method, edit, recorded):
    out = tmp_path / "x.png"
    code, _, err = call(capsys, argv(ckpt, out, "--regulate", "--method", method, "--targets", "circle",
                                     *(["--edit-steps", edit] if edit else [])))
    assert code == 0, err
    s = parameters(out)
    assert s["Regulation edit steps"] == recorded   # A&E's default 25 is capped at --steps 2
    assert "Schedule type" not in s and s["Timestep spacing"] == "leading"


def test_size_rule_is_the_models(tmp_path, capsys, no_sampling):
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip(f"{DEFAULT_CHECKPOINT} is absent")
    # the shipped model: VAE factor 8, 3 UNet levels -> multiples of 32 (104 is a multiple of 8)
    line = refused(capsys, ["--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path / "o"), "--height", "104"])
    assert "--height 104 is not a multiple of 32" in line and "try 96 or 128" in line


# --- 4. non-finite latents ---------------------------------------------------------------------------------------

def test_non_finite_latents_stop_at_their_step(ckpt):
    from minisd.attention import AttentionHook
    from minisd.loading import load_model

    class PoisonAt(AttentionHook):
        def __init__(self, step):
            self.at = step

        def wants(self, layer):
            return layer.is_cross and self.step == self.at

        def edit_probs(self, layer, logits, probs):
            return probs * float("nan")

    pipe = minisd.pipeline.Pipeline(load_model(ckpt))
    calls = []
    with pytest.raises(minisd.pipeline.NonFiniteError, match=r"step 2 of 4 .*float32.*guidance 3"):
        pipe(PROMPT, steps=4, guidance=3, hooks=[PoisonAt(1)], callback=lambda info: calls.append(info["i"]))
    assert calls == [0]   # stopped at the step it happened, not after computing the rest


def test_overflow_in_float16_is_an_error_not_a_black_image(ckpt, tmp_path, capsys):
    code, _, err = call(capsys, argv(ckpt, tmp_path / "out", "--dtype", "float16", "--guidance", "1e30"))
    assert code == 2 and "Traceback" not in err, err
    assert re.search(r"error: the latents stopped being finite at step \d of 2 \(dtype float16, guidance 1e\+30\)", err)
    assert "float32" in err and not (tmp_path / "out").exists()


# --- 5. prompts over 77 tokens -----------------------------------------------------------------------------------

def test_long_prompt_targets_come_from_the_kept_tokens_and_the_cut_is_said_once(ckpt, tmp_path, capsys):
    prompt = "a red circle and a blue square" + " and a green star" * 20 + " and a yellow moon"
    code, out, err = call(capsys, argv(ckpt, tmp_path / "x.png", "--regulate", "--save-attention",
                                       str(tmp_path / "maps"), prompt=prompt))
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the prompt is longer than"), err
    assert "moon" in lines[0] and ".py" not in err   # the cut-off tail, not a Python warning with a file path
    chosen = re.search(r"targets chosen from the prompt: (.*)", out).group(1).split()
    assert "moon" not in chosen and chosen[:3] == ["circle", "square", "star"]
    # every chosen star is one of the kept ones (the 77 positions hold 17 of the 21 stars)
    assert max(int(w.split("#")[1]) for w in chosen if "#" in w) <= 17
    assert parameters(tmp_path / "x.png")["Regulation targets"] == " ".join(chosen)


# --- 7. small things ----------------------------------------------------------------------------------------------

def test_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: )" not in text
    assert re.search(r"--seed SEED [^(]*\(default: 0\)", " ".join(text.split()))   # 0 is a default too
    for a in build_parser()._actions:
        if a.help:
            assert " ".join(a.help.split()).count("default") <= 1


def test_grid_titles_steps_layers_and_metadata(ckpt, tmp_path, capsys, monkeypatch):
    import minisd.maps
    seen, real_grid = [], minisd.maps.grid

    def grid(runs, words, cell=128):
        seen.append([title for title, _, _ in runs])
        return real_grid(runs, words, cell)
    monkeypatch.setattr(minisd.maps, "grid", grid)
    totals, real_tqdm = [], minisd.sample.tqdm
    monkeypatch.setattr(minisd.sample, "tqdm", lambda **kw: totals.append(kw["total"]) or real_tqdm(**kw))
    out, maps = tmp_path / "x.png", tmp_path / "maps"
    code, _, err = call(capsys, argv(ckpt, out, "--regulate", "--method", "attend-excite", "--targets", "circle",
                                     "--regulate-layers", "input_blocks.1", "--save-attention", str(maps)))
    assert code == 0, err
    assert seen == [["plain", "Attend-and-Excite"]]
    assert totals == [2 * 2]     # 2 steps, regulated then plain
    g = Image.open(maps / "x-attention.png")
    s = parameters(maps / "x-attention.png")
    # the layers shown are the regulated ones, in both runs, not the model's default
    assert s["Attention layers"] == "input_blocks.1" and s["Regulation layers"] == "input_blocks.1"
    assert s["Regulation"] == "Attend-and-Excite" and s["Seed"] == "0" and s["Attention steps"] == "0 1"
    scale = np.asarray(g.convert("RGB")).astype(int)[-25, 4:4 + 256]   # the colour scale: dark blue -> yellow
    assert scale[0, 2] > scale[0, 0] and scale[-1, 0] > 200 and scale[-1, 1] > 150 and scale[-1, 2] < 50


def test_observed_layers_are_the_regulated_ones(ckpt):
    from minisd.loading import load_model
    from minisd.blocks import block_of
    from minisd.maps import AttentionMaps
    from regulation.editors import choose_targets, make_editor
    pipe = minisd.pipeline.Pipeline(load_model(ckpt))
    targets = choose_targets(pipe.tokenizer, PROMPT, ["circle"], log=lambda *a: None)
    for layers in (None, "output_blocks.5", "8x8"):
        editor = make_editor("regulate", pipe, PROMPT, targets, steps=2, edit_steps=2, layers=layers)
        maps = AttentionMaps(targets[0].positions, [0, 1], editor.select)
        pipe(PROMPT, steps=2, hooks=[editor, maps], decode=False)
        regulated = {block_of(name) for name in editor.history}
        assert regulated and maps.blocks_seen == regulated, (layers, regulated, maps.blocks_seen)
