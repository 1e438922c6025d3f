"""The command line on a tiny SD 3.5 file in the official layout (random weights, T5's tokenizer beside it as a
diffusers folder keeps it): Attention Regulation and Attend-and-Excite end to end with the token tables and the
maps; the methods that do not read joint attention refused in one line."""
import pytest
import torch
from PIL import Image

from minisd.config import tiny_sd3
from minisd.sample import main
from tools.parity import save_official

try:
    from test_sd3 import official_state, train_t5_tokenizer
except ImportError:
    from tests.test_sd3 import official_state, train_t5_tokenizer

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("sd3-cli")
    cfg = tiny_sd3(True)
    path = tmp / "tiny-sd3.5.safetensors"
    save_official(path, official_state(cfg, seed=4), cfg)
    train_t5_tokenizer(tmp / "tokenizer_3")
    return path


def run(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("method", ["regulate", "attend-excite"])
def test_method_with_maps(checkpoint, tmp_path, capsys, method):
    out, maps = tmp_path / "out", tmp_path / "maps"
    code, stdout, err = run(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--method", method,
                             "--save-attention", str(maps), "--steps", "2", "--out", str(out)], capsys)
    assert code == 0, err
    assert "CLIP tokens" in stdout and "T5 tokens" in stdout and "circle" in stdout and "square" in stdout
    image = Image.open(next(out.glob("*.png")))
    assert image.size == (32, 32)
    assert "Regulation layers: joint_blocks.1" in image.info["parameters"]
    grid = Image.open(next(maps.glob("*-attention.png")))
    assert "joint_blocks.1" in grid.info["parameters"] and grid.size[0] > 3 * 128


def test_regulate_flag_and_euler(checkpoint, tmp_path, capsys):
    code, stdout, err = run(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--regulate", "--targets",
                             "circle", "--sampler", "euler", "--steps", "2", "--out", str(tmp_path / "x.png")],
                            capsys)
    assert code == 0, err
    assert (tmp_path / "x.png").is_file() and "Sampler: Euler" in Image.open(tmp_path / "x.png").info["parameters"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "syngen"], "does not run on SD 3"),
    (["--method", "composable"], "does not run on SD 3"),
    (["--sampler", "ddim"], "SD 3 samples with euler, dpmpp_2m"),
    (["--decoder", "taesd", "--taesd", "x.safetensors"], "SD 3 decodes with its VAE"),
    (["--regulate", "--regulate-layers", "joint_blocks.9"], "names no joint block"),
    (["--height", "34"], "multiple of 4"),
])
def test_refused_in_one_line(checkpoint, tmp_path, capsys, argv, message):
    code, _, err = run(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--steps", "1",
                        "--out", str(tmp_path / "o")] + argv, capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err
