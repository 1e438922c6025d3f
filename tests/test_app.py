"""The app (minisd/app.py) in a real browser: headless Chromium, Debian's package, driven by Playwright. The page
runs a prompt with Attention Regulation, shows both images and the maps, moves along the steps, and its PNGs are
the command line's, bit for bit, with the same parameters; errors are the command line's one line, naming the
page's fields where it names flags.

Needs the test extra (Gradio and Playwright) and `apt-get install -y chromium` (.ci/run does both). Set
MINISD_SCREENSHOTS=eval/app to keep the page's screenshots there (docs/app.md)."""
import csv
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minisd.app import MAPS_DIR, PRESET_PROMPT, PRESET_SEED, App, default_targets, page_argv, page_words, plain_command

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
STEPS = 12   # short runs: what is checked does not depend on the length


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    # the app and the command line run with the same threads, as a person's shell would give them
    return {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minisd.app", "--port", str(port)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 180
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"the app did not start: {proc.stdout.read()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (Debian's package; .ci/run installs it)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(server)
    page.wait_for_selector("#run")
    yield page
    context.close()


def screenshot(page, name, tmp_path):
    folder = Path(os.environ.get("MINISD_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)
    assert (folder / name).stat().st_size > 10_000


def field(page, selector):
    return page.locator(selector).input_value()


def commands(page):
    """The command lines shown under the images: {"Attention Regulation": argv, "plain": argv}."""
    text = page.locator("#command .cm-content").inner_text()
    out, title = {}, None
    for line in text.splitlines():
        if line.startswith("# "):
            title = line[2:]
        elif line.startswith("python -m minisd.sample "):
            out[title] = shlex.split(line)[3:]
    return out


def cli(argv, out, tmp_path):
    """Run a shown command as a person would, its files redirected into tmp_path; returns its stderr."""
    argv = [a if a != MAPS_DIR else str(tmp_path / "maps") for a in argv]
    r = subprocess.run([sys.executable, "-m", "minisd.sample", *argv, "--out", str(out)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 or r.stderr.startswith("error:"), r.stderr
    return r


def download(page, button, path):
    with page.expect_download() as d:
        page.click(button)
    d.value.save_as(path)
    return Image.open(path)


def wait_for_run(page):
    page.wait_for_selector("#plain-image img")
    page.wait_for_selector("#method-image img")
    page.wait_for_selector("#maps img")


def test_the_preset_shows_what_regulation_is_for(page, tmp_path):
    """The page as a newcomer opens it, Run: plain drops the star, Attention Regulation brings it back (the
    shapes judge says so of the downloaded PNGs), at the model's 50 steps."""
    from tools.testbed.judge import ShapesJudge
    page.click("#run")
    wait_for_run(page)
    assert "(seed 1, 50 steps)" in page.locator("#status").inner_text()
    screenshot(page, "preset.png", tmp_path)
    judge, objects = ShapesJudge(), [["green", "star"], ["yellow", "cross"]]
    plain = np.asarray(download(page, "#download-plain", tmp_path / "plain.png").convert("RGB"))
    regulated = np.asarray(download(page, "#download-method", tmp_path / "regulated.png").convert("RGB"))
    assert judge(plain, objects) == [False, True]
    assert judge(regulated, objects) == [True, True]


def test_regulation_in_the_browser_equals_the_command_line(page, tmp_path):
    page.fill("#prompt textarea", "a red circle and a blue square")
    page.wait_for_function("document.querySelector('#targets textarea').value === 'circle square'")
    page.fill("#steps input", str(STEPS))
    page.fill("#seed input", "3")
    page.click("#method label:has-text('plain')")
    page.click("#method label:has-text('Attention Regulation')")
    page.click("#run")
    wait_for_run(page)
    status = page.locator("#status").inner_text()
    assert "plain and Attention Regulation in" in status and f"{STEPS} steps" in status
    assert "circle</w>" in page.locator("#tokens .cm-content").inner_text()
    assert page.locator("#loss").is_visible()
    assert f"maps at step {STEPS - 1}," in page.locator("#maps-step").inner_text()
    grid = page.locator("#maps img").get_attribute("src")
    screenshot(page, "regulated.png", tmp_path)

    # the step slider: to step 0, and the maps follow
    page.fill("#step input[type=number]", "0")
    page.press("#step input[type=number]", "Enter")
    page.wait_for_function("document.querySelector('#maps-step').innerText.includes('maps at step 0,')")
    page.wait_for_function(f"document.querySelector('#maps img').src !== {grid!r}")   # a new picture
    grid = page.locator("#maps img").get_attribute("src")
    page.click("#view label:has-text('alone')")
    page.wait_for_function(f"document.querySelector('#maps img').src !== {grid!r}")
    screenshot(page, "maps-alone.png", tmp_path)

    method_png = download(page, "#download-method", tmp_path / "page-method.png")
    plain_png = download(page, "#download-plain", tmp_path / "page-plain.png")
    settings = method_png.info["parameters"]
    assert settings.startswith("a red circle and a blue square\n")
    assert f"Steps: {STEPS}," in settings and "Seed: 3," in settings
    assert "Regulation: Attention Regulation" in settings and "Regulation targets: circle square" in settings
    assert "Regulation" not in plain_png.info["parameters"]

    # the commands shown remake both images, bit for bit, with the same parameters
    shown = commands(page)
    assert set(shown) == {"Attention Regulation", "plain"}
    for title, png in (("Attention Regulation", method_png), ("plain", plain_png)):
        cli(shown[title], tmp_path / f"cli-{title}.png", tmp_path)
        made = Image.open(tmp_path / f"cli-{title}.png")
        assert made.info["parameters"] == png.info["parameters"]
        assert np.array_equal(np.asarray(made), np.asarray(png)), title
    # and regulation changed the image: the pair is not two copies of one picture
    assert not np.array_equal(np.asarray(method_png), np.asarray(plain_png))


def test_errors_are_the_command_lines_one_line(page, tmp_path):
    page.fill("#prompt textarea", "it is raining")
    page.wait_for_function("document.querySelector('#targets textarea').value === ''")
    page.click("#run")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('error:')")
    line = page.locator("#status").inner_text().strip()
    screenshot(page, "error.png", tmp_path)
    r = cli(["--prompt", "it is raining", "--regulate"], tmp_path / "x.png", tmp_path)
    assert r.returncode == 2 and line == page_words(r.stderr.strip(), "regulate") and "no object words" in line
    assert '"target words" field' in line and "--targets" not in line   # the page's field, not the flag
    assert "Traceback" not in page.content()

    # a layout that is not four numbers
    page.fill("#prompt textarea", "a red circle and a blue square")
    page.wait_for_function("document.querySelector('#targets textarea').value === 'circle square'")
    page.click("#method label:has-text('DenseDiffusion')")
    page.wait_for_function("document.querySelector('#targets textarea').value.startsWith('red circle:')")
    page.fill("#targets textarea", "red circle:0.1,0.1,0.5")
    page.click("#run")
    page.wait_for_function("document.querySelector('#status').innerText.includes('four numbers')")
    r = cli(["--prompt", "a red circle and a blue square", "--method", "dense", "--layout", "red circle:0.1,0.1,0.5"],
            tmp_path / "y.png", tmp_path)
    assert page.locator("#status").inner_text().strip() == page_words(r.stderr.strip(), "dense")

    # a checkpoint that does not load
    page.click("#method label:has-text('plain')")
    page.click("text=model")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    page.fill("#checkpoint textarea", str(bad))
    page.click("#run")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('error:')")
    r = cli(["--prompt", "a red circle and a blue square", "--checkpoint", str(bad)], tmp_path / "z.png", tmp_path)
    assert r.returncode == 2 and page.locator("#status").inner_text().strip() == page_words(r.stderr.strip(), "plain")


def test_stop_and_a_second_tab_that_is_not_blocked(browser, server, tmp_path):
    first, second = (browser.new_page(viewport={"width": 1400, "height": 1000}) for _ in range(2))
    for page in (first, second):
        page.set_default_timeout(120_000)
        page.goto(server)
        page.wait_for_selector("#run")
    first.fill("#steps input", "500")   # long: minutes
    first.click("#run")
    first.wait_for_selector("#status [role=progressbar]")
    # while it runs, the other tab's page answers (its targets follow its prompt)
    second.fill("#prompt textarea", "a green heart and a red cross")
    second.wait_for_function("document.querySelector('#targets textarea').value === 'heart cross'")
    assert first.locator("#status [role=progressbar]").count() == 1   # still running
    first.click("#stop")
    first.wait_for_function("document.querySelector('#status').innerText.startsWith('stopped at step')")
    assert first.locator("#plain-image img").count() == 0
    # the queue is free again: the second tab runs
    second.fill("#steps input", str(STEPS))
    second.click("#run")
    second.wait_for_function("document.querySelector('#status').innerText.startsWith('plain and')")
    for page in (first, second):
        page.close()


# --- without a browser ---------------------------------------------------------------------------------------

def test_a_checkpoint_that_does_not_load_stops_the_app_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minisd.app", "--port", str(free_port()), "--checkpoint",
                        str(tmp_path / "missing.safetensors")], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr == f"error: checkpoint not found: {tmp_path / 'missing.safetensors'}\n"

DEFAULTS = {"checkpoint": "weights/minisd-shapes.safetensors", "device": "cpu", "dtype": "float32", "steps": 50,
            "guidance": 5.0, "parser": {"--checkpoint": "weights/minisd-shapes.safetensors", "--device": "cpu",
                                        "--dtype": "float32"}}


@pytest.fixture(scope="module")
def tokenizer():
    from minisd.tokenizer import Tokenizer
    return Tokenizer()


def fields(**kw):
    return {"prompt": "a red circle and a blue square", "seed": 0, "steps": 50, "guidance": 5.0,
            "method": "regulate", "targets": "circle square", "weights": "", **kw}


def test_page_argv_is_the_command_a_person_types(tokenizer):
    argv, plain = page_argv(fields(), tokenizer, DEFAULTS)
    # defaults and the automatic targets are left out; the maps need --save-attention in both
    assert argv == ["--prompt", "a red circle and a blue square", "--method", "regulate",
                    "--save-attention", MAPS_DIR]
    assert plain == ["--prompt", "a red circle and a blue square", "--save-attention", MAPS_DIR]
    argv, _ = page_argv(fields(targets="circle", seed=7, steps=20, guidance=7.5), tokenizer, DEFAULTS)
    assert argv[2:] == ["--steps", "20", "--guidance", "7.5", "--seed", "7", "--method", "regulate",
                        "--targets", "circle", "--save-attention", MAPS_DIR]
    argv, plain = page_argv(fields(method="composable", targets=""), tokenizer, DEFAULTS)
    assert "--save-attention" not in argv + plain   # Composable Diffusion has no maps to show
    argv, _ = page_argv(fields(prompt="-a dog", method="plain", targets=""), tokenizer, DEFAULTS)
    assert argv[0] == "--prompt=-a dog"   # a prompt that starts with "-" is not taken for a flag


def test_page_errors_name_the_pages_fields():
    """The page has no flags: a command line's error names the field that fills the flag, as the page labels it."""
    line = "found no object words in 'it is raining'; name them with --targets"
    assert page_words(line, "regulate") == \
        "found no object words in 'it is raining'; name them with the \"target words\" field"
    assert page_words(line, "syngen").endswith('the "modifier-noun pairs" field')
    assert page_words("--layout needs a box", "dense") == 'the "layout" field needs a box'
    assert page_words("--concept-weights: 2 for 3 concepts", "composable").startswith('the "concept weights" field')
    assert page_words("--height 30 is not a multiple of 8", "regulate").startswith("--height 30")   # no such field


def test_targets_are_filled_by_the_command_lines_rule(tokenizer):
    prompt = "a red circle and a blue square"
    assert default_targets(tokenizer, "regulate", prompt) == "circle square"
    assert default_targets(tokenizer, "syngen", prompt) == "red circle; blue square"
    assert default_targets(tokenizer, "composable", prompt) == "a red circle | a blue square"
    assert default_targets(tokenizer, "dense", prompt) == \
        "red circle:0.05,0.25,0.45,0.75;blue square:0.55,0.25,0.95,0.75"   # a box per object, side by side
    assert default_targets(tokenizer, "regulate", "it is raining") == ""


def test_the_preset_is_the_benchmarks_first_dropped_object_that_regulation_brings_back():
    """The rule of docs/app.md, on eval/shapes-methods/results.csv: by prompt_id then seed, the first case where
    plain's image has an omission and regulate[nouns]'s has none and every named object in its colour."""
    rows = {(int(r["prompt_id"]), int(r["seed"]), r["method"]): r
            for r in csv.DictReader(open(ROOT / "eval/shapes-methods/results.csv"))}
    first = None
    for p, s in sorted({(p, s) for p, s, m in rows if m == "plain"}):
        plain, reg = rows[(p, s, "plain")], rows[(p, s, "regulate[nouns]")]
        if json.loads(plain["types"])["omission"] and not json.loads(reg["types"])["omission"] \
                and reg["all_found"] == "1":
            first = (plain["prompt"], s)
            break
    assert first == (PRESET_PROMPT, PRESET_SEED)


@pytest.mark.parametrize("method", ["plain", "regulate", "attend-excite", "syngen", "dense", "composable"])
def test_every_method_gives_the_command_lines_images(method, tmp_path):
    """The page's code path (its argv, the command line's parser and checks, minisd/generate.py) against
    minisd.sample.main on the commands it shows: the same pixels and the same parameters, plain and method."""
    from minisd.images import parameters_text
    from minisd.sample import main
    app = App()
    prompt = "a red circle and a blue square"
    f = fields(method=method, steps=3, targets=default_targets(app.pipe.tokenizer, method, prompt),
               weights="7.5 | 3" if method == "composable" else "")
    argv, plain_argv = page_argv(f, app.pipe.tokenizer, app.defaults(app.checkpoint))
    out, job = app.run_argv(argv)
    shown = [(argv, out.image, out.settings)]
    if plain_argv:
        shown.append((plain_command(plain_argv, job), out.plain, None))
    for i, (command, image, settings) in enumerate(shown):
        path = tmp_path / f"{i}.png"
        main([a if a != MAPS_DIR else str(tmp_path / f"maps{i}") for a in command] + ["--out", str(path)])
        made = Image.open(path)
        assert np.array_equal(np.asarray(made), np.asarray(image)), command
        if settings:
            assert made.info["parameters"] == parameters_text(prompt, "", settings)
    if method == "composable":
        assert "Regulation concept weights: 7.5 | 3" in parameters_text(prompt, "", out.settings)
