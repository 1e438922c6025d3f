"""tools/bench/methods.py's per-step part on SDXL, run on the tiny SDXL config (--tiny): the same code that times
the full-size architecture, in seconds. Checks that every figure is a positive number and that the regulated steps
really edited the layers they name (the editor's history, and a step output that differs from the plain one).
And its whole-generation part (--generations) on the fast path."""
import re

import numpy as np
import pytest
import torch

from minisd.config import tiny_sdxl
from tools.bench import methods as bench_methods
from tools.bench.methods import STEP_METHODS, one_block

PREFIX = "model.diffusion_model."


def block_of(name):
    """`model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2` -> `input_blocks.3`."""
    return re.match(PREFIX + r"((?:input|output)_blocks\.\d+|middle_block)\.", name).group(1)


def run(capsys, *extra):
    # the tests' own thread count: main sets torch's, and would otherwise take every core for the rest of the run
    results = bench_methods.main(["--only", "sdxl", "--tiny", "--runs", "1", "--threads",
                                  str(torch.get_num_threads()), *extra])
    return results["sdxl"], capsys.readouterr().out


def test_sdxl_steps_are_timed_and_regulation_edits(capsys):
    results, out = run(capsys)
    assert list(results) == list(STEP_METHODS)
    for method, r in results.items():
        assert r["wall"] > 0 and r["cpu"] > 0, (method, r)
        assert r["peak"] is None or r["peak"] > 0
    ratios = [float(v) for v in re.findall(r"([\d.]+)x", out.split("projected 50-step overhead")[1])]
    # 2 regulate rows, syngen, dense, composable, A&E least and most: wall / CPU each
    assert len(ratios) == 2 * 5 + 4 and all(v > 0 for v in ratios), out

    cfg = tiny_sdxl()
    edited = {m: sorted(results[m]["hook"].history) for m in ("regulate", "regulate-layers")}
    # the default blocks: every cross-attention layer in them, and nothing else
    blocks = {block_of(name) for name in edited["regulate"]}
    assert blocks == set(cfg.default_blocks()) and all(n.endswith(".attn2") for n in edited["regulate"])
    assert edited["regulate-layers"] == [PREFIX + one_block(cfg) + ".attn2"]
    assert "1 cross-attention layer(s) edited" in out
    plain = results["plain"]["out"]
    for method in ("regulate", "regulate-layers"):
        assert not torch.equal(results[method]["out"], plain), f"{method} did not change the step's output"
    x_new, after = results["attend-excite"]["out"]
    assert torch.equal(after, plain) and results["attend-excite"]["hook"].history[1]["loss_before"]
    x_syn, after = results["syngen"]["out"]    # SynGen moved the latents; its step is then a plain one
    assert torch.equal(after, plain) and not torch.equal(x_syn, x_new) and results["syngen"]["hook"].history[1]
    assert not torch.equal(results["dense"]["out"], plain) and results["dense"]["hook"].edited
    assert results["composable"]["out"].shape == plain.shape and not torch.equal(results["composable"]["out"], plain)


def test_sdxl_methods_subset_and_layers(capsys):
    """--methods leaves steps out (a user skips SDXL's backward pass); --regulate-layers names the cheaper row."""
    cfg = tiny_sdxl()
    block = cfg.default_blocks()[-1]
    results, out = run(capsys, "--methods", "plain", "regulate-layers", "--regulate-layers", block)
    assert list(results) == ["plain", "regulate-layers"] and "attend-excite" not in out
    assert {block_of(n) for n in results["regulate-layers"]["hook"].history} == {block}


def test_regulation_edges_tool_runs_and_the_optimiser_is_deterministic():
    """tools.bench.edges on the tiny config: with no noise every draw gives the same best loss (the optimiser
    is a deterministic function of its logits and seed), so differences it reports at some noise are the edit's
    edges, not run-to-run noise."""
    from tools.bench import edges as regulation_edges
    rows = regulation_edges.main(["--family", "tiny", "--px", "64", "--noise", "0", "1e-3", "--draws", "3",
                                  "--threads", "1"])
    assert len(set(rows[0.0])) == 1 and len(rows[1e-3]) == 3
    assert all(v == v and v > 0 for v in rows[1e-3])   # finite, positive losses


def test_whole_generations_on_the_fast_path(capsys):
    """--generations times whole runs, plain and regulated, on the OpenVINO fast path (the tiny config, 3 steps):
    both are timed and the regulated image is not the plain one, so the hooks ran inside the compiled UNet."""
    pytest.importorskip("openvino")
    r = bench_methods.main(["--only", "sd15", "--generations", "--tiny", "--steps", "3", "--runs", "1",
                            "--backend", "openvino", "--dtype", "float32", "--threads", str(torch.get_num_threads())])
    med, out = r["sd15"], capsys.readouterr().out
    assert all(med[m][0] > 0 and med[m][1] > 0 for m in ("plain", "regulate")), out
    assert "backend openvino" in out and re.search(r"regulate .*/ plain: [\d.]+x wall", out), out
    plain, regulated = (np.asarray(med["images"][m].images[0], dtype=np.float32) for m in ("plain", "regulate"))
    assert np.abs(plain - regulated).max() > 0, "regulation changed nothing on the fast path"
