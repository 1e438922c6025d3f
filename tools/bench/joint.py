"""How much memory does regulating a joint block of SD 3.5 cost?

One call of one joint block at SD 3.5 Large's width (hidden 2432, 38 heads, qk norm), random weights, CPU, float32,
batch 2 (the two halves of classifier-free guidance), 154 text tokens (77 CLIP + 77 T5) and 512 px = 32 x 32 patches
= 1024 image tokens, in three variants, each in a fresh process:
  plain     no hook: the joint attention through SDPA;
  lean      Attention Regulation on the conditional half, as at step 0 (three target columns): the split-key path
            of minisd/attention.py (hooked_joint_attention), the text keys explicit, the image keys folded;
  explicit  the same edit on the whole (text + image)^2 logits and softmax in float32 (explicit_joint_attention
            below: the path the joint attention took before the split-key merge).
The figure is the growth of the process's peak resident memory during the call over its resident memory just
before it (Linux: the peak is reset through /proc/self/clear_refs), so the block's weights and inputs are not
counted. The explicit path's 1024 px figure (4096 image tokens) is computed, not measured (it needs about 18 GB
more): its growth over plain divided by the size of one (batch, heads, text + image, text + image) float32 square,
times that size at 1024 px. The other variants measure at 1024 px in a few minutes (--px 1024 --variants lean).

    python -m tools.bench joint                       # 512 px, SD 3.5 Large's width (about a minute on 2 cores)
    python -m tools.bench joint --px 1024 --variants lean        # 1024 px measured, without the whole square's 18 GB
    python -m tools.bench joint --px 256 --width 256 --heads 4   # seconds: a check
"""
import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("plain", "lean", "explicit")
TEXT_TOKENS = 154


def explicit_joint_attention(layer, q, k, v):
    """The joint attention's explicit path before the split-key merge, kept as the baseline and as the tests'
    reference: the whole float32 logits and softmax over [text, image] x [text, image]; the hooks (each must
    understand joint attention) get the image queries' rows over every key, whose text columns `cross_block` cuts
    alike, and the text queries' rows are left as they are."""
    from minisd.attention import at_least_float32
    active = [h for h in layer.hooks if h.wants(layer)]
    if not active:
        return F.scaled_dot_product_attention(q, k, v)
    if not all(h.understands_joint for h in active):
        raise ValueError("explicit_joint_attention gives hooks the joint rows: every hook must understand them")
    text, image = layer.text_keys, slice(layer.text_keys.stop, None)
    logits = (at_least_float32(q) @ at_least_float32(k).transpose(-1, -2)) * layer.scale
    rows = logits[:, :, image]
    for h in active:
        rows = h.edit_logits(layer, rows)
    probs = torch.cat([logits[:, :, text], rows], 2).softmax(-1)
    rows = probs[:, :, image]
    for h in active:
        rows = h.edit_probs(layer, logits[:, :, image], rows)
    return torch.cat([probs[:, :, text], rows], 2).to(v.dtype) @ v


def regulation_hook(n_text, cond_rows, targets=(2, 5, 80), specials=(0, 8, 90), seed=0):
    """Attention Regulation on every joint block it is given, as at step 0 of a 50-step run (one image)."""
    from regulation.attention_regulation import JointRegulation
    hook = JointRegulation(list(targets), list(specials), 50, select=lambda layer: True, generator=seed)
    hook.begin_run([seed])
    hook.begin_step(0, cond_rows)
    return hook


def joint_block(width, heads, seed=0):
    """One joint block of SD 3.5 Large's kind (qk norm, no attn2) with random weights, named as block 19."""
    from minisd.mmdit import JointBlock
    torch.manual_seed(seed)
    block = JointBlock(width, heads, 4.0, pre_only=False, qk_norm=True, with_attn2=False).eval()
    block.requires_grad_(False)
    block.joint.name = "model.diffusion_model.joint_blocks.19"
    return block


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(variant, px, width, heads, batch=2):
    """In a fresh process: -> {"mb": peak resident growth during one block call, "seconds": its wall time}."""
    import time
    import minisd.mmdit
    side = px // 16   # VAE factor 8, patch 2
    block = joint_block(width, heads)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, side * side, width, generator=g)
    context = torch.randn(batch, TEXT_TOKENS, width, generator=g)
    c = torch.randn(batch, width, generator=g)
    if variant != "plain":
        block.joint.hooks = [regulation_hook(TEXT_TOKENS, slice(batch // 2, batch))]
    if variant == "explicit":
        minisd.mmdit.hooked_joint_attention = explicit_joint_attention
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")   # resets the peak (VmHWM) to the present size
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        block(context, x, c, (side, side))
    seconds = time.perf_counter() - start
    return {"mb": (_status_kb("VmHWM") - before) / 1024, "seconds": seconds}


def run_child(variant, args):
    cmd = [sys.executable, "-m", "tools.bench.joint", "--child", variant, "--px", str(args.px), "--width",
           str(args.width), "--heads", str(args.heads), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def square_mb(px, heads, batch=2):
    """One (batch, heads, text + image, text + image) float32 tensor, in MB."""
    return batch * heads * (TEXT_TOKENS + (px // 16) ** 2) ** 2 * 4 / 2 ** 20


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench joint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--px", type=int, default=512, help="image side in pixels (tokens: (px / 16)^2)")
    ap.add_argument("--width", type=int, default=2432, help="the block's width (SD 3.5 Large: 2432)")
    ap.add_argument("--heads", type=int, default=38, help="attention heads (SD 3.5 Large: 38)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                    help="which to measure (plain is always measured: the others are given over it)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.px % 16 or args.width % args.heads:
        ap.error("--px must be a multiple of 16 and --width of --heads")
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.px, args.width, args.heads)))
        return None
    print(f"one joint block call, width {args.width}, {args.heads} heads, batch 2, {TEXT_TOKENS} text tokens, "
          f"{args.px} px ({(args.px // 16) ** 2} image tokens), float32, CPU, {args.threads} threads; "
          f"torch {torch.__version__}", flush=True)
    rows = {v: run_child(v, args) for v in VARIANTS if v == "plain" or v in args.variants}
    plain = rows["plain"]["mb"]
    print("\n| variant | peak growth MB | over plain MB | seconds | computed at 1024 px: over plain MB |\n"
          "|---|---|---|---|---|")
    for v, r in rows.items():
        over = r["mb"] - plain
        at_1024 = f"{over / square_mb(args.px, args.heads) * square_mb(1024, args.heads):.0f}" \
            if v == "explicit" else ""
        print(f"| {v} | {r['mb']:.0f} | {over:.0f} | {r['seconds']:.1f} | {at_1024} |")
    return rows


if __name__ == "__main__":
    main()
