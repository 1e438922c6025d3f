"""tools/bench/sd3.py and tools/bench/joint.py on small configs: the SD 3.5 speed rows run and minisd's outputs
equal diffusers' (one MMDiT call and a 4-step run from the same noise and embeddings); the joint block's memory
rows run in fresh processes and the split-key path grows the peak less than the whole square."""

from tools.bench import joint, sd3


def test_sd3_rows_on_the_tiny_model():
    rows = sd3.measure("tiny-sd3.5", 64, "float32", rounds=1, threads=1)
    assert [r["row"] for r in rows] == ["call", "run"]
    for r in rows:
        assert r["finite"] and r["minisd_s"] > 0 and r["diffusers_s"] > 0
        # measured near 1e-6 (float32 rounding through 3 blocks and 4 steps)
        assert r["max_diff"] < 1e-4, r


def test_joint_memory_rows(capsys):
    rows = joint.main(["--px", "256", "--width", "128", "--heads", "8", "--threads", "1"])
    assert set(rows) == {"plain", "lean", "explicit"}
    over = {v: rows[v]["mb"] - rows["plain"]["mb"] for v in rows}
    # the whole square is 2 x 8 x 410^2 floats (10.3 MB) and the explicit path holds several; the lean rows 2.4 MB
    assert over["explicit"] > over["lean"] + 10
    assert "| explicit |" in capsys.readouterr().out
