"""tools/eval/why.py's Attend-and-Excite probe on a tiny random SD: the observer leaves the plain image as it is,
and what it records is the hook's own loss and refinement."""
import numpy as np
import pytest
import torch

from minisd.checkpoint import build_model
from minisd.config import tiny
from minisd.pipeline import Pipeline
from tools.eval import why
from tools.eval.paper_table import validation_prompts


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return Pipeline(build_model(tiny(image_size=32)).eval())


def test_observer_reads_the_maps_without_moving_the_latents(pipe):
    item = validation_prompts()[0]
    observed, rec = why.attend_excite_run(pipe, item, 100, steps=3, observe_only=True)
    plain = pipe(item["prompt"], steps=3, seed=100).images[0]
    assert np.array_equal(np.asarray(observed), np.asarray(plain))
    assert sorted(rec["steps"]) == [0, 1, 2]
    for s in rec["steps"].values():
        assert s["push"] == 0 and len(s["passes"]) == 1 and s["tries"] is None
        p = s["passes"][0]
        assert len(p["maxima"]) == len(p["maxima_first_dropped"]) == 2 and len(p["token_max"]) == len(rec["tokens"])


def test_probe_records_the_hooks_loss_and_refinement(pipe):
    item = validation_prompts()[0]
    _, rec = why.attend_excite_run(pipe, item, 100, steps=3)
    first = rec["steps"][0]
    assert len(first["passes"]) == 1 + first["tries"]   # the step's pass, then one per refinement try
    for s in rec["steps"].values():
        for p in s["passes"]:
            assert p["loss"] == pytest.approx(max(0.0, 1 - min(p["maxima"])), abs=1e-6)
        assert s["push"] > 0 and s["move"] > 0


def test_plain_only_summary(pipe, tmp_path):
    items = validation_prompts()[:1]
    out = why.attend_excite(pipe, items, [100], steps=2, out=tmp_path, plain_only=True, log=lambda *a: None)
    assert [r["step"] for r in out["per_step"]] == [0, 1]
    for r in out["per_step"]:   # dropping a column can only raise the others' shares
        assert r["maxima_first_dropped"]["weaker"] >= r["maxima"]["weaker"] - 1e-6
    assert (tmp_path / "records.jsonl").read_text().count("\n") == 1


def test_auc():
    assert why.auc([0.1, 0.2, 0.9], [False, True, True]) == 1.0
    assert why.auc([0.5, 0.5], [True, False]) == 0.5
    assert why.auc([0.1, 0.2], [True, True]) is None
