"""tools/eval/evaluate.py under torchrun: two CPU ranks (gloo) on the shipped tiny model give exactly the rows one
process gives (timings aside); a rank killed mid-run (SIGKILL) loses nothing that it had written, and the same
command run again draws every missing unit once, never one twice, ignoring a torn last line."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.eval import evaluate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "minisd-shapes.safetensors"
# 2 prompts x 2 seeds = 4 units, 2 methods each; rank 0 draws units 0 and 2, rank 1 units 1 and 3
ARGS = ["--checkpoint", str(SHIPPED), "--judge", "tools.testbed.judge:ColourJudge", "--limit", "2", "--seeds", "2",
        "--steps", "2", "--threads", "1", "--examples", "2"]
# 2 steps: plain misses objects, so there are examples to gather from the ranks (the shipped model gets every
# colour right in 4 steps)

pytestmark = pytest.mark.skipif(not SHIPPED.is_file(),
                                reason="the shipped model weights/minisd-shapes.safetensors is absent")


def torchrun(out, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tools.eval.evaluate", *ARGS, "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True,
                          text=True, timeout=600)


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def part_rows(out):
    """Every complete row of every part file, as evaluate reads them."""
    settings = rows_of(out / "results.csv")[0]["settings"]
    return [r for p in evaluate.part_files(out) for r in evaluate.read_rows(p, settings)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "eval"
    evaluate.main([*ARGS, "--out", str(out)])
    rows = rows_of(out / "results.csv")
    assert len(rows) == 8
    return rows


def test_two_ranks_give_the_rows_of_one_process(one_process, tmp_path):
    out = tmp_path / "eval"
    run = torchrun(out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert without_timing(rows_of(out / "results.csv")) == without_timing(one_process)
    plain_missed = any(r["method"] == "plain" and r["all_found"] == "0" for r in one_process)
    assert plain_missed and (out / "table.md").is_file() and (out / "examples.png").is_file()
    assert "2 rank(s)" in (out / "table.md").read_text()
    # each rank wrote its own part, round-robin: rank r drew units r, r + 2
    parts = {p.name: {(r["prompt_id"], r["seed"]) for r in rows_of(p)} for p in evaluate.part_files(out)}
    assert parts == {"part-0001-rank00000.csv": {("0", "0"), ("1", "0")},
                     "part-0001-rank00001.csv": {("0", "1"), ("1", "1")}}


def test_a_killed_rank_is_resumed_with_every_unit_exactly_once(one_process, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    killed = torchrun(out, MINISD_EVAL_KILL_AFTER="1:1")    # rank 1 SIGKILLs itself after its first unit
    assert killed.returncode != 0 and not (out / "results.csv").exists()
    rank1 = rows_of(out / "parts" / "part-0001-rank00001.csv")
    assert [(r["prompt_id"], r["seed"]) for r in rank1] == [("0", "1")] * 2     # its one finished unit is kept
    # a write torn by a kill: a row without its newline must be ignored, not read as a row
    with open(out / "parts" / "part-0001-rank00001.csv", "a") as f:
        f.write('1,1,plain,"a torn')

    again = torchrun(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert int(re.search(r"\((\d+) already in", again.stdout).group(1)) >= 1
    rows = part_rows(out)
    keys = [(r["prompt"], r["seed"], r["method"]) for r in rows]
    assert len(keys) == len(set(keys)) == 8                 # none twice, none lost
    assert without_timing(rows_of(out / "results.csv")) == without_timing(one_process)
    # and a third run, here in one process, finds nothing to do
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("a finished unit was drawn again"))
    evaluate.main([*ARGS, "--out", str(out)])
    assert len(part_rows(out)) == 8
