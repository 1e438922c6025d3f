"""tools/bench/launches.py on the tiny config: a UNet call runs on the meta device, the regulated call runs one
descent per regulated layer, and the counts order as they must (plain < compiled optimiser < eager optimiser)."""
import torch

from minisd.blocks import block_of
from minisd.checkpoint import new_model
from minisd.config import FAMILIES
from tools.bench import launches


def test_launch_counts_on_the_tiny_model(capsys):
    c = launches.count("tiny", 64)
    cfg = FAMILIES["tiny"]()
    with torch.device("meta"):
        names = [n for n, _ in new_model(cfg).named_modules() if n.endswith("attn2")]
    regulated = [n for n in names if block_of(n) in cfg.default_blocks()]
    assert c["descents"] == len(regulated) > 0
    assert c["descent_ops"] >= c["descents"] * 19 * 10   # about 19 ops per iteration, 20 iterations each
    assert c["plain"] < c["compiled"] < c["eager"]
    assert c["eager"] - c["plain"] > c["descent_ops"]   # the rest of the regulated layers' work comes on top
    out = launches.main(["--family", "tiny", "--size", "64", "--steps", "10", "--edit-steps", "5"])
    assert out["eager run"] == 5 * (c["eager"] - c["plain"]) / (10 * c["plain"])
    assert "| regulated, compiled optimiser |" in capsys.readouterr().out
