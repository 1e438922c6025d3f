"""How long does a whole generation take in minisd, next to diffusers' StableDiffusionPipeline, on the same weights?

A generation is everything a user waits for: prompt -> text embeddings -> `steps` sampler steps, each a UNet call
on the two halves of classifier-free guidance -> VAE decode -> PIL image. Both pipelines start from the same
latents, with the same sampler (DPM-Solver++(2M) by default, configured as SD ships it), and the runs alternate
between them so that a change of load on the machine hits both alike.

  tiny   the shipped model, weights/minisd-shapes.safetensors, at its own size; diffusers gets the same tensors
         through diffusers' own converters (`diffusers_from_minisd`).
  sd15   the full SD 1.5 architecture with random weights at 256 px: diffusers' pipeline is built from the SD 1.5
         configs written out below, saved with save_pretrained, and minisd loads that folder. Slow on CPU
         (minutes per image at 20 steps, and about 8 GB of memory for the two models).

    python -m tools.bench generate                         # both; 20 steps, guidance 7.5, 3 runs
    python -m tools.bench generate --only tiny --steps 2 --runs 1
    python -m tools.bench generate --only tiny --random-tiny   # minisd.config.tiny() with random weights
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tools.bench.timing import timed

ROOT = Path(__file__).resolve().parents[2]   # the repository
SHIPPED = ROOT / "weights" / "minisd-shapes.safetensors"
TEXT = "cond_stage_model.transformer.text_model."
PROMPTS = {"tiny": "a red circle above a blue square", "sd15": "a photo of a cat and a dog on a sofa"}

# The diffusers configs of SD 1.5 (the unet/, vae/ and text_encoder/ config.json of the official repository),
# written out so that the benchmark does not need the Hub.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


# ------------------------------------------------------------------------------------- diffusers, as SD ships it

def sd_scheduler(sampler="dpmpp_2m", prediction="epsilon"):
    """The diffusers scheduler equal to a minisd sampler, with SD's scheduler_config.json settings."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  steps_offset=1, timestep_spacing="leading",
                  prediction_type="v_prediction" if prediction == "v" else "epsilon")
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"no diffusers scheduler for sampler {sampler!r}; choose ddim or dpmpp_2m")


def clip_tokenizer(folder, pad_with_eot=True):
    """transformers' CLIPTokenizer over minisd's shipped vocabulary (written to `folder` as vocab.json and
    merges.txt). SD 1 pads with <|endoftext|>, SD 2 with "!"."""
    import transformers
    from tools.parity import write_clip_vocab
    pad = "<|endoftext|>" if pad_with_eot else "!"
    write_clip_vocab(Path(folder), pad_token=pad)
    # transformers 4's Python CLIPTokenizer splits some scripts differently; its fast one is 5's CLIPTokenizer
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    cls = transformers.CLIPTokenizer if v5 else transformers.CLIPTokenizerFast
    return cls.from_pretrained(str(folder), pad_token=pad, model_max_length=77)


def make_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_pipeline(unet_config, vae_config, text_config, vocab_folder, pad_with_eot=True, sampler="dpmpp_2m",
                    prediction="epsilon", seed=0, std=0.02):
    """A diffusers StableDiffusionPipeline with random weights, perturbed with noise so that the layers the
    references zero-initialise are not zero (a zero layer hides any mistake in what it silences)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tools.parity import clip_text, perturb
    unet = perturb(UNet2DConditionModel(**unet_config), std=std, seed=seed)
    vae = perturb(AutoencoderKL(**vae_config), std=std, seed=seed + 1)
    clip = perturb(clip_text(text_config), std=std / 2, seed=seed + 2)
    return make_pipeline(unet, vae, clip, clip_tokenizer(vocab_folder, pad_with_eot),
                         sd_scheduler(sampler, prediction))


def save_folder(pipe, folder):
    """`save_pretrained`, then the two files of the Hub's SD folders that transformers 5 no longer writes:
    text_encoder/model.safetensors under the `text_model.` names (transformers 5 drops that level) and the
    tokenizer's vocab.json / merges.txt / special_tokens_map.json (5 writes only tokenizer.json).
    minisd's loader reads the Hub layout, which is what published SD folders have."""
    from safetensors.torch import load_file, save_file
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    te = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(te))
    if not any(k.startswith("text_model.") for k in state):
        save_file({"text_model." + k: v for k, v in state.items()}, str(te), metadata={"format": "pt"})
    tok = folder / "tokenizer"
    if not (tok / "vocab.json").is_file():
        bpe = json.loads((tok / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        (tok / "vocab.json").write_text(json.dumps(bpe["vocab"]), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    if not (tok / "special_tokens_map.json").is_file():
        pad = pipe.tokenizer.pad_token
        (tok / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}), encoding="utf-8")
    return folder


def diffusers_from_minisd(model, vocab_folder, sampler="dpmpp_2m"):
    """The same weights in diffusers' modules, moved by diffusers' own converters (not minisd's key mapping)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from tools.parity import clip_text, diffusers_unet_config
    cfg, state = model.cfg, model.state_dict()
    unet = UNet2DConditionModel(**diffusers_unet_config(cfg.unet))
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, dict(unet.config)), strict=True)
    v = cfg.vae
    vae = AutoencoderKL(in_channels=v.in_channels, out_channels=v.out_ch, latent_channels=v.z_channels,
                        block_out_channels=[v.ch * m for m in v.ch_mult], layers_per_block=v.num_res_blocks,
                        down_block_types=["DownEncoderBlock2D"] * len(v.ch_mult),
                        up_block_types=["UpDecoderBlock2D"] * len(v.ch_mult), norm_num_groups=v.groups,
                        scaling_factor=v.scale_factor)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, dict(vae.config)), strict=True)
    t = cfg.text
    # diffusers' SD 2 text encoder is cut after the layer SD reads, and its last_hidden_state is what the UNet sees
    layers = t.num_hidden_layers - (1 if t.penultimate else 0)
    clip = clip_text(dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                          num_hidden_layers=layers, num_attention_heads=t.num_attention_heads, hidden_act=t.hidden_act,
                          max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps))
    tower = getattr(clip, "text_model", clip)  # transformers 5 has no `text_model` level
    text = {k[len(TEXT):]: val for k, val in state.items()
            if k.startswith(TEXT) and not k.endswith("position_ids")
            and not k[len(TEXT):].startswith(f"encoder.layers.{layers}.")}
    tower.load_state_dict(text, strict=False)  # position_ids is a buffer some versions keep
    return make_pipeline(unet.eval(), vae.eval(), clip.eval(), clip_tokenizer(vocab_folder, t.pad_with_eot),
                         sd_scheduler(sampler, cfg.prediction))


# ------------------------------------------------------------------------------------------------- the timing


def compare(name, mine, theirs, size, args):
    """Time whole generations of the two pipelines, alternating; -> a result row."""
    import numpy as np
    side = size // mine.cfg.vae.downsample
    latents = torch.randn(1, mine.cfg.unet.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    prompt = PROMPTS.get(name, PROMPTS["tiny"])

    def run_minisd(steps):
        return mine(prompt, steps=steps, guidance=args.guidance, latents=latents.clone(), height=size, width=size,
                    sampler=args.sampler).images[0]

    def run_diffusers(steps):
        return theirs(prompt, num_inference_steps=steps, guidance_scale=args.guidance, latents=latents.clone(),
                      height=size, width=size).images[0]

    with torch.inference_mode():
        run_minisd(min(2, args.steps)), run_diffusers(min(2, args.steps))  # warm-up: allocations, kernel choices
        times = {"minisd": [], "diffusers": []}
        for _ in range(args.runs):
            a, *t = timed(lambda: run_minisd(args.steps))
            times["minisd"].append(t)
            b, *t = timed(lambda: run_diffusers(args.steps))
            times["diffusers"].append(t)
    med = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in times.items()}
    diff = int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
    return dict(model=name, size=size, minisd=med["minisd"], diffusers=med["diffusers"], max_pixel_diff=diff)


def tiny_pipelines(args, tmp):
    from minisd.checkpoint import build_model
    from minisd.loading import load_model
    from minisd.config import tiny
    from minisd.pipeline import Pipeline
    if args.random_tiny:
        model, what = build_model(tiny(image_size=32)), "minisd.config.tiny() with random weights"
    else:
        if not SHIPPED.is_file():
            raise SystemExit(f"error: {SHIPPED} is missing (train it with python -m tools.testbed.train, or pass "
                             f"--random-tiny)")
        model, what = load_model(SHIPPED), str(SHIPPED.relative_to(ROOT))
    theirs = diffusers_from_minisd(model, Path(tmp) / "vocab-tiny", args.sampler)
    return Pipeline(model.eval()), theirs, args.size or model.cfg.image_size, what


def sd15_pipelines(args, tmp):
    from minisd.pipeline import Pipeline
    start = time.perf_counter()
    theirs = random_pipeline(SD15_UNET, SD15_VAE, SD15_TEXT, Path(tmp) / "vocab-sd15", sampler=args.sampler)
    folder = save_folder(theirs, Path(tmp) / "sd15")
    mine = Pipeline.from_checkpoint(folder)
    print(f"  built SD 1.5 with random weights and loaded its folder into minisd in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return mine, theirs, args.size or 256, "SD 1.5 architecture, random weights"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--size", type=int, default=None,
                    help="image side in pixels (default: the tiny model's own, sd15 256)")
    ap.add_argument("--runs", type=int, default=3, help="timed generations of each pipeline (median reported)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    ap.add_argument("--only", choices=["tiny", "sd15"], default=None, help="one model only")
    ap.add_argument("--sampler", choices=["dpmpp_2m", "ddim"], default="dpmpp_2m")
    ap.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    ap.add_argument("--random-tiny", action="store_true",
                    help="tiny: minisd.config.tiny() with random weights instead of the shipped file (32 px)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.runs < 1:
        ap.error("--steps and --runs must be at least 1")
    torch.set_num_threads(args.threads)
    import diffusers
    print(f"whole generation, batch 1, {args.sampler}, {args.steps} steps, guidance {args.guidance}, "
          f"{args.threads} threads, median of {args.runs} runs; torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("tiny", tiny_pipelines), ("sd15", sd15_pipelines)):
            if args.only and args.only != name:
                continue
            mine, theirs, size, what = build(args, tmp)
            print(f"  {name}: {what}, {size} px", flush=True)
            rows.append(compare(name, mine, theirs, size, args))
            r = rows[-1]
            print(f"  {name}: minisd {r['minisd'][0]:.3f} s, diffusers {r['diffusers'][0]:.3f} s per image", flush=True)
            del mine, theirs
    print("\n| model | px | minisd s/image | diffusers s/image | minisd/diffusers | CPU s minisd | CPU s diffusers | "
          "max pixel diff |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        (mw, mc), (dw, dc) = r["minisd"], r["diffusers"]
        print(f"| {r['model']} | {r['size']} | {mw:.3f} | {dw:.3f} | {mw / dw:.2f} | {mc:.3f} | {dc:.3f} | "
              f"{r['max_pixel_diff']} |")
    return rows


if __name__ == "__main__":
    main()
