"""How fast is minisd's MMDiT next to diffusers' SD3Transformer2DModel?

Full-size SD 3.5 Medium (or --family), random weights under the official names (tools/parity.py's random_official:
the same in every process), CPU, batch 2 (the two halves of guidance), 77 + 77 text tokens. One process per dtype;
both models hold the same tensors (diffusers' own single-file converter; it copies q, k and v only). Two rows:
  call  one MMDiT call: minisd's `mmdit(x, t, y=, context=)` against diffusers' `transformer(hidden_states=, ...)`;
  run   a 4-step run under guidance 4.5, Euler on the rectified flow (shift 3), from the same starting noise and the
        same text embeddings: minisd's SD3Pipeline (its text embedded once per run, MMDiT.prepare; tiny random
        CLIPs, no T5, so the text costs milliseconds) against diffusers' StableDiffusion3Pipeline given the
        embeddings (prompt_embeds ...) and asked for latents. Neither decodes.
Times are medians of interleaved rounds (each round runs every path once) after one untimed call of each model; the
ratio is minisd's time over diffusers' in the same rounds. "max diff" compares the two outputs, relative to the
largest of diffusers'.

    python -m tools.bench sd3 --px 256 --rounds 2                    # SD 3.5 Medium: long, 12 GB in float32
    python -m tools.bench sd3 --px 256 --rounds 1 --rows run --depth 4      # its first 3 blocks and the last
    python -m tools.bench sd3 --family tiny-sd3.5 --px 64 --rounds 1   # seconds: a check
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PREFIX = "model.diffusion_model."
STEPS, GUIDANCE = 4, 4.5


def diffusers_config(mmdit):
    """SD3Transformer2DModel's arguments for a minisd MMDiTConfig."""
    return dict(sample_size=128, patch_size=mmdit.patch_size, in_channels=mmdit.in_channels,
                out_channels=mmdit.in_channels, num_layers=mmdit.depth, attention_head_dim=mmdit.hidden_size //
                mmdit.num_heads, num_attention_heads=mmdit.num_heads, joint_attention_dim=mmdit.context_dim,
                caption_projection_dim=mmdit.hidden_size, pooled_projection_dim=mmdit.adm_in_channels,
                pos_embed_max_size=mmdit.pos_embed_max_size, qk_norm="rms_norm" if mmdit.qk_norm else None,
                dual_attention_layers=list(mmdit.x_block_self_attn_layers))


def small_text(cfg):
    """Tiny random CLIPs with the widths the MMDiT reads (pooled: CLIP-L's width + CLIP-G's projection), no T5."""
    from minisd.config import TextConfig
    clip_g = 1280 if cfg.adm_in_channels > 1280 else cfg.adm_in_channels // 2   # the official widths, or halves
    return (TextConfig(hidden_size=cfg.adm_in_channels - clip_g, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, penultimate=True, final_norm=False, key_layout="sd3"),
            TextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       hidden_act="gelu", penultimate=True, final_norm=False, pad_with_eot=False, key_layout="sd3",
                       projection_dim=clip_g))


def build(family, dtype, depth=None):
    """-> (minisd's SD3Pipeline with the family's MMDiT, diffusers' StableDiffusion3Pipeline with its own
    transformer on the same tensors). The VAE stays on the meta device: nothing decodes. `depth` cuts the stack to
    its first depth - 1 blocks and the pre-only last one (as tools/parity.py: sd3_parity)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from minisd.config import FAMILIES
    from minisd.mmdit import MMDiT
    from minisd.model_sd3 import StableDiffusion3
    from minisd.pipeline_sd3 import SD3Pipeline
    from minisd.text import SD3Text
    from tools.parity import random_official
    cfg = FAMILIES[family]()
    m = cfg.mmdit
    if depth:
        m.depth, m.x_block_self_attn_layers = depth, tuple(i for i in m.x_block_self_attn_layers if i < depth - 1)
    cfg.t5, (cfg.text, cfg.text2) = None, small_text(m)
    with torch.device("meta"):
        model = StableDiffusion3(cfg)
        shapes = {PREFIX + k: v.shape for k, v in MMDiT(m).state_dict().items()}
        theirs = SD3Transformer2DModel(**diffusers_config(m))
    state = random_official(shapes, seed=1, dtype=dtype)
    torch.manual_seed(0)
    model.text_encoders = SD3Text(cfg.text, cfg.text2, None, m.context_dim).to(dtype)
    model.mmdit.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, strict=True, assign=True)
    theirs.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(state)), strict=True, assign=True)
    del state
    scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
    pipe = StableDiffusion3Pipeline(theirs.eval(), scheduler, None, None, None, None, None, None, None)
    pipe.set_progress_bar_config(disable=True)
    return SD3Pipeline(model.eval()), pipe


def measure(family, px, dtype_name, rounds, threads, rows=("call", "run"), depth=None):
    """In a child process: build both, then time the rows in interleaved rounds."""
    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    mine, theirs = build(family, dtype, depth)
    mmdit, transformer = mine.model.mmdit, theirs.transformer
    prompt = "a red circle left of a blue square"
    with torch.no_grad():
        context, y = mine.encode(["", prompt])     # the negative (empty) prompt first, as the pipelines guide
    g = torch.Generator().manual_seed(0)
    side = px // 8
    x = torch.randn(2, mmdit.cfg.in_channels, side, side, generator=g).to(dtype)
    t = torch.tensor([750.0, 750.0])
    noise = torch.randn(1, mmdit.cfg.in_channels, side, side, generator=g).to(dtype)
    paths = {
        ("call", "minisd"): lambda: mmdit(x, t, y=y, context=context),
        ("call", "diffusers"): lambda: transformer(hidden_states=x, timestep=t, encoder_hidden_states=context,
                                                   pooled_projections=y).sample,
        ("run", "minisd"): lambda: mine(prompt, steps=STEPS, guidance=GUIDANCE, sampler="euler", height=px,
                                        width=px, latents=noise, decode=False, return_latents=True).latents,
        ("run", "diffusers"): lambda: theirs(prompt_embeds=context[1:], negative_prompt_embeds=context[:1],
                                             pooled_prompt_embeds=y[1:], negative_pooled_prompt_embeds=y[:1],
                                             num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=px,
                                             width=px, latents=noise, output_type="latent").images,
    }
    times, outputs = {k: [] for k in paths if k[0] in rows}, {}
    with torch.inference_mode():
        for impl in ("minisd", "diffusers"):   # warm-up: one untimed call of each model
            paths["call", impl]()
        for _ in range(rounds):
            for k in times:
                start = time.perf_counter()
                outputs[k] = paths[k]()
                times[k].append(time.perf_counter() - start)
    out = []
    for row in rows:
        a, b = outputs[row, "minisd"].float(), outputs[row, "diffusers"].float()
        per = [p / q for p, q in zip(times[row, "minisd"], times[row, "diffusers"])]
        out.append(dict(row=row, dtype=dtype_name, minisd_s=statistics.median(times[row, "minisd"]),
                         diffusers_s=statistics.median(times[row, "diffusers"]), ratio=statistics.median(per),
                         ratios=per, max_diff=((a - b).abs().max() / b.abs().max()).item(),
                         finite=bool(torch.isfinite(a).all() and torch.isfinite(b).all())))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench sd3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="sd3.5-medium", help="sd3.5-medium (default), sd3-medium, tiny-sd3.5 ...")
    ap.add_argument("--px", type=int, default=256, help="image side in pixels")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timed rounds after one warm-up call each")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", nargs="+", default=["call", "run"], choices=["call", "run"])
    ap.add_argument("--depth", type=int, help="the first depth - 1 joint blocks and the last only (default: all)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.depth is not None and args.depth < 2:
        ap.error("--depth must be at least 2 (a joint block and the pre-only last one)")
    if args.child:
        print(json.dumps(measure(args.family, args.px, args.dtypes[0], args.rounds, args.threads, args.rows,
                                 args.depth)))
        return None
    import diffusers
    blocks = f" (first {args.depth - 1} joint blocks and the last)" if args.depth else ""
    print(f"MMDiT of {args.family}{blocks}, random weights, {args.px} px, batch 2, {args.threads} threads, median of "
          f"{args.rounds} interleaved rounds after one warm-up call each; torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rows = []
    for dtype in args.dtypes:
        cmd = [sys.executable, "-m", "tools.bench.sd3", "--child", "--family", args.family, "--px", str(args.px),
               "--dtypes", dtype, "--rounds", str(args.rounds), "--threads", str(args.threads), "--rows", *args.rows]
        cmd += ["--depth", str(args.depth)] if args.depth else []
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        if p.returncode != 0:
            print(f"  {dtype} failed (exit {p.returncode})", file=sys.stderr)
            continue
        rows += json.loads(p.stdout.strip().splitlines()[-1])
    print(f"\n| what | dtype | minisd s | diffusers s | minisd / diffusers (rounds) | max diff (rel.) |\n"
          f"|---|---|---|---|---|---|")
    for r in rows:
        what = "one MMDiT call" if r["row"] == "call" else f"{STEPS}-step run"
        print(f"| {what} | {r['dtype']} | {r['minisd_s']:.2f} | {r['diffusers_s']:.2f} | {r['ratio']:.2f} "
              f"({min(r['ratios']):.2f}-{max(r['ratios']):.2f}) | {r['max_diff']:.1e} |"
              + ("" if r["finite"] else " non-finite!"))
    return rows


if __name__ == "__main__":
    main()
