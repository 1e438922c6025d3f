"""Reading and writing weights.

Official single-file checkpoints load with no rename table: the module paths of `StableDiffusion` are their keys.
Three rules cover what differs:
  1. Training state is dropped: every key outside `model.diffusion_model.`, `first_stage_model.` and
     `cond_stage_model.` (`model_ema.*`, `betas`, `alphas_cumprod`, optimizer state ...), the VAE's training loss
     (`first_stage_model.loss.*`), CLIP's contrastive head (`logit_scale`; SD 1/2's unused `text_projection`) and
     the `position_ids` buffer.
  2. SD 2.x and SDXL store OpenCLIP's text tower (`cond_stage_model.model.*`, `conditioner.embedders.1.model.*`,
     fused `in_proj`): `openclip_to_hf` maps it onto CLIPTextModel's names.
  3. diffusers folders (`unet/`, `vae/`, `text_encoder/`; SD 3's `transformer/` and three text encoders):
     `diffusers_to_official` renames block by block, rules derived from the folder's config; the VAE's mid-block
     attention is Linear there, 1x1 conv here; SD 3's q, k, v are fused here.
  4. SD 3 (`model.diffusion_model.joint_blocks.*`): the text encoders keep transformers' names under
     `text_encoders.{clip_l, clip_g, t5xxl}.transformer.`; CLIP-L's projection (the identity, unused) is dropped;
     T5's tied embedding may be stored as `shared.weight`, `encoder.embed_tokens.weight` or both. Text encoders
     can come from their separate official files (`clip_l.safetensors`, ...), whose keys get that prefix.
Whatever remains must match the model exactly: missing keys, unexpected keys and wrong shapes are all named in one
error, never a partial load.
"""
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import MMDiTConfig, ModelConfig, sd1, sd2, sd35_large, sd35_medium, sd3_medium, sdxl
from .model import StableDiffusion

PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.")
SD3_TEXT = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
            "t5xxl": "text_encoders.t5xxl.transformer."}
# the flag that supplies each SD 3 text encoder from its own file
SD3_TEXT_FLAGS = {"clip_l": "--clip-l (clip_l.safetensors)", "clip_g": "--clip-g (clip_g.safetensors)",
                  "t5xxl": "--t5 (t5xxl_fp16.safetensors)"}
TEXT = "cond_stage_model.transformer.text_model."
OPENCLIP = "cond_stage_model.model."
XL_TEXT = "conditioner.embedders.0.transformer.text_model."   # SDXL's CLIP ViT-L, transformers' names
XL_OPENCLIP = "conditioner.embedders.1.model."                # SDXL's OpenCLIP ViT-bigG, OpenCLIP's names
# Where an OpenCLIP tower's keys go: its CLIPTextModel's prefix, and the TextEncoder that holds text_projection.
OPENCLIP_TO_HF = {OPENCLIP: ("cond_stage_model.transformer.text_model.", "cond_stage_model."),
                  XL_OPENCLIP: ("conditioner.embedders.1.transformer.text_model.", "conditioner.embedders.1.")}
# What each part of a checkpoint is, to name a part that is missing as a whole.
PARTS = {"model.diffusion_model.": "the UNet", "first_stage_model.": "the VAE",
         "cond_stage_model.": "the text encoder",
         "conditioner.embedders.0.": "SDXL's first text encoder (CLIP ViT-L, conditioner.embedders.0.transformer.*)",
         "conditioner.embedders.1.": "SDXL's second text encoder (OpenCLIP ViT-bigG, conditioner.embedders.1.model.*)",
         "text_encoders.clip_l.": f"SD 3's CLIP-L text encoder: give it with {SD3_TEXT_FLAGS['clip_l']}",
         "text_encoders.clip_g.": f"SD 3's OpenCLIP bigG text encoder: give it with {SD3_TEXT_FLAGS['clip_g']}"}


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(Exception):
    pass


# what minisd uses when no checkpoint is named: the tiny model trained by tools.testbed.train
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "minisd-shapes.safetensors"


def file_hash(path):
    """AUTOMATIC1111's model hash: the first 10 hex digits of the file's sha256 (of all files, for a folder)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:10]


# ---------------------------------------------------------------------------------------------- reading files

def read_safetensors(path, dtype=None, float32_prefixes=()):
    """-> (tensors, metadata). Checks the header first so a wrong or cut file says so instead of crashing.
    With `dtype`, floating tensors are cast one by one as they are read, so a float32 file loaded in bfloat16
    never holds all its float32 tensors at once; those under `float32_prefixes` are read in float32 instead."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 0 or n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path} is not a safetensors file (no valid header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) and "data_offsets" in v
                                               for k, v in header.items() if k != "__metadata__"):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a table of tensors)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: the header describes {8 + n + end} bytes, the file has {size}")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    def target(k):
        return torch.float32 if dtype is not None and k.startswith(float32_prefixes) else dtype

    stored = {k: SAFETENSORS_DTYPES.get(v["dtype"]) for k, v in entries.items()}
    if dtype is None or all(d is None or d == dtype or not d.is_floating_point
                            for k, d in stored.items() if not k.startswith(float32_prefixes)):
        # nothing to cast but the small float32 part: safetensors' memory map, whose pages load only as the
        # weights are used
        tensors = load_file(str(path))
        return {k: _cast(v, target(k)) for k, v in tensors.items()}, header.get("__metadata__") or {}
    # read() into a buffer per tensor, not a memory map: mapped pages of the whole file would stay resident
    tensors = {}
    with open(path, "rb") as f:
        for k, v in entries.items():
            if v["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {k} has dtype {v['dtype']}, which minisd does not read")
            start, stop = v["data_offsets"]
            buf = bytearray(stop - start)
            f.seek(8 + n + start)
            f.readinto(buf)
            t = torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[v["dtype"]]) if buf else \
                torch.empty(0, dtype=SAFETENSORS_DTYPES[v["dtype"]])
            tensors[k] = _cast(t.reshape(v["shape"]), target(k))
    return tensors, header.get("__metadata__") or {}


def _cast(t, dtype):
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def read_checkpoint(path, allow_pickle=False, dtype=None, float32_prefixes=()):
    """A single file: safetensors, or (only when the caller opts in) a pickle .ckpt read with weights_only=True."""
    path = Path(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        if not allow_pickle:
            raise CheckpointError(f"{path} is a pickle checkpoint, which can run code when loaded; convert it to "
                                  f"safetensors, or opt in with allow_pickle=True (--allow-pickle)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise CheckpointError(f"{path} could not be read as a weights-only pickle: "
                                  f"{str(e).splitlines()[0]}") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
        return obj.get("state_dict", obj), {}
    return read_safetensors(path, dtype, float32_prefixes)


def inference_keys(state):
    """Rule 1: keep what inference uses, drop training state."""
    def keep(k):
        return (k.startswith(PREFIXES) and not k.startswith("first_stage_model.loss.")
                and not k.endswith((".position_ids", "logit_scale"))
                and not (k.startswith("cond_stage_model.") and k.endswith("text_projection"))
                and k != SD3_TEXT["clip_l"] + "text_projection.weight")
    state = {k: v for k, v in state.items() if keep(k)}
    # T5's input embedding is one tensor under two names (tied): keep both names on it, from whichever is stored
    shared, embed = SD3_TEXT["t5xxl"] + "shared.weight", SD3_TEXT["t5xxl"] + "encoder.embed_tokens.weight"
    if shared in state or embed in state:
        state[shared] = state[embed] = state.get(shared, state.get(embed))
    return state


def openclip_to_hf(state):
    """Rule 2: OpenCLIP's text tower -> CLIPTextModel names. The fused in_proj is split into q, k, v; SDXL's
    `text_projection` stays a matrix (OpenCLIP's `x @ P`) on the TextEncoder."""
    names = {"token_embedding.weight": "embeddings.token_embedding.weight",
             "positional_embedding": "embeddings.position_embedding.weight",
             "ln_final.": "final_layer_norm.", "ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.",
             "attn.out_proj.": "self_attn.out_proj.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
             "transformer.resblocks.": "encoder.layers."}
    out = {}
    for k, v in state.items():
        src = next((p for p in OPENCLIP_TO_HF if k.startswith(p)), None)
        if src is None:
            out[k] = v
            continue
        text, owner = OPENCLIP_TO_HF[src]
        rest = k[len(src):]
        if rest == "text_projection":
            out[owner + rest] = v
            continue
        for a, b in names.items():
            rest = rest.replace(a, b)
        if ".attn.in_proj_" in rest:
            stem, kind = rest.split(".attn.in_proj_")
            if v.shape[0] % 3:
                raise CheckpointError(f"{k}: fused q/k/v of shape {tuple(v.shape)}, not 3 equal parts")
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{text}{stem}.self_attn.{name}_proj.{kind}"] = part
        else:
            out[text + rest] = v
    return out


# ------------------------------------------------------------------------------------------ version detection

def detect_config(state, metadata=None, path=None, prediction=None):
    """Our own checkpoints carry their config in the metadata; official ones are told apart by the width of the
    text embedding the UNet's cross-attention reads (768: SD 1.x with CLIP ViT-L, 1024: SD 2.x with OpenCLIP).
    Prediction type: `prediction` if given, else the stored config, else v for SD 2.x files whose name says 768 or
    `-v` as a word (the 768 px SD 2 models predict v), else epsilon."""
    metadata = metadata or {}
    if "minisd_config" in metadata:
        cfg = ModelConfig.from_json(metadata["minisd_config"])
    elif "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in state:
        cfg = detect_sd3(state, path)
    elif any(k.startswith("conditioner.") for k in state) or "model.diffusion_model.label_emb.0.0.weight" in state:
        cfg = detect_sdxl(state, path)
    else:
        key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        width = state[key].shape[1] if key in state else None
        if width == 768 and any(k.startswith(TEXT) for k in state):
            cfg = sd1()
        elif width == 1024 and any(k.startswith(OPENCLIP) for k in state):
            stem = Path(path).stem.lower() if path else ""
            cfg = sd2(v_prediction="768" in stem or re.search(r"(^|[-_])v([-_.]|$)", stem) is not None)
        else:
            raise CheckpointError(
                f"unknown architecture{f' in {path}' if path else ''}: not SD 1.x or 2.x (cross-attention width "
                f"{width}, {len(state)} keys) and no minisd_config in its metadata")
    if prediction:
        if prediction not in ("epsilon", "v"):
            raise CheckpointError(f"prediction must be 'epsilon' or 'v', not {prediction!r}")
        cfg.prediction = prediction
    return cfg


def detect_sd3(state, path=None):
    """SD 3 / 3.5: the MMDiT's shape read from its tensors, as Stability's reference reads it (width = 64 x depth,
    heads = depth, qk norm where `ln_k` exists, image-only attention where `x_block.attn2` exists). The family (SD 3
    Medium, SD 3.5 Medium, SD 3.5 Large) gives the defaults that the reference keys by file name."""
    pre = "model.diffusion_model."
    patch = state[pre + "x_embedder.proj.weight"]
    depth = len({k.split(".")[3] for k in state if k.startswith(pre + "joint_blocks.")})
    attn2 = sorted({int(k.split(".")[3]) for k in state
                    if k.startswith(pre + "joint_blocks.") and ".x_block.attn2." in k})
    m = MMDiTConfig(depth=depth, hidden_size=patch.shape[0], num_heads=patch.shape[0] // 64,
                    patch_size=patch.shape[2], in_channels=patch.shape[1],
                    pos_embed_max_size=round(state[pre + "pos_embed"].shape[1] ** 0.5),
                    adm_in_channels=state[pre + "y_embedder.mlp.0.weight"].shape[1],
                    context_dim=state[pre + "context_embedder.weight"].shape[1],
                    qk_norm=pre + "joint_blocks.0.x_block.attn.ln_k.weight" in state,
                    x_block_self_attn_layers=tuple(attn2))
    return sd3_config(m)


def sd3_config(m):
    """The family's config (its defaults, which Stability's reference keys by file name) around an MMDiT shape:
    38 blocks are SD 3.5 Large, image-only attention SD 3.5 Medium, else SD 3 Medium."""
    cfg = sd35_large() if m.depth == 38 else sd35_medium() if m.x_block_self_attn_layers else sd3_medium()
    cfg.mmdit = m
    return cfg


def sd3_text_file(name, path, dtype=None):
    """One of SD 3's text encoders from its own official file (`clip_l.safetensors`: transformers' names with no
    prefix) -> its keys under the single file's prefix."""
    raw, _ = read_checkpoint(path, dtype=dtype)
    prefix = SD3_TEXT[name]
    return {prefix + k: v for k, v in raw.items()}


def detect_sdxl(state, path=None):
    """SDXL base is told by its UNet: a vector input (label_emb) and 2048-wide cross-attention. The refiner (one
    text encoder, OpenCLIP bigG at `conditioner.embedders.0.model.*`, 1280-wide context, aesthetic-score input) is
    refused by name; a base file with a text encoder missing still detects as SDXL, so the check names what is
    missing."""
    where = f" ({path})" if path else ""
    if any(k.startswith("conditioner.embedders.0.model.") for k in state):
        raise CheckpointError(f"this is an SDXL refiner checkpoint (sd_xl_refiner_1.0){where}: minisd generates with "
                              f"SDXL base (sd_xl_base_1.0); the refiner, an image-to-image model with one text "
                              f"encoder and an aesthetic-score input, is not supported")
    label = state.get("model.diffusion_model.label_emb.0.0.weight")
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    width = state[key].shape[1] if key in state else None
    if label is None or width != 2048:
        raise CheckpointError(
            f"unknown SDXL-like architecture{where}: it has `conditioner.*` text encoders, but "
            + ("no UNet vector input (model.diffusion_model.label_emb.0.0.weight)" if label is None else
               f"cross-attention width {width} (SDXL base: 2048 at input_blocks.4)"))
    return sdxl()


# ------------------------------------------------------------------------------------------ loading the model

def mismatch_message(path, missing, unexpected, shapes, want=()):
    parts = [f"{path} does not match the model:"]
    for prefix, what in PARTS.items():  # a part missing as a whole is named once, not key by key
        gone = [k for k in missing if k.startswith(prefix)]
        if gone and len(gone) == sum(k.startswith(prefix) for k in want):
            parts.append(f"  missing: {what}, all {len(gone)} keys {prefix}*")
            missing = [k for k in missing if not k.startswith(prefix)]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            parts.append(f"  {len(items)} {title}:\n" + "\n".join(f"    {x}" for x in items))
    return "\n".join(parts)


def check_text_file(want, state, name, file):
    """The keys that `file`, given by its own flag, supplies are SD 3's `name` text encoder's: else one line that
    names that file and its flag (not the main checkpoint, which is not at fault)."""
    prefix = SD3_TEXT[name]
    mine, theirs = {k for k in want if k.startswith(prefix)}, {k for k in state if k.startswith(prefix)}
    missing, unexpected = sorted(mine - theirs), sorted(theirs - mine)
    shapes = [k for k in sorted(mine & theirs) if state[k].shape != want[k].shape]
    short = lambda k: k[len(prefix):]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the encoder's {len(mine)} keys missing (e.g. {short(missing[0])})")
    if unexpected:
        problems.append(f"{len(unexpected)} keys the encoder does not have (e.g. {short(unexpected[0])})")
    if shapes:
        problems.append(f"{len(shapes)} of the wrong shape (e.g. {short(shapes[0])}: "
                        f"{tuple(state[shapes[0]].shape)}, not {tuple(want[shapes[0]].shape)})")
    if problems:
        flag, _, usual = SD3_TEXT_FLAGS[name].partition(" ")
        raise CheckpointError(f"{file}, given with {flag}, is not the text encoder this model reads there {usual}: "
                              + "; ".join(problems))


def check_state(want, state, path=""):
    """Every key the model has, no other key, every shape right; all problems named in one error."""
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(want[k].shape)}"
              for k in sorted(set(want) & set(state)) if state[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(mismatch_message(path, missing, unexpected, shapes, want))


def new_model(cfg):
    """The model class of a config's family: StableDiffusion (UNet) or StableDiffusion3 (MMDiT)."""
    if cfg.is_sd3:
        from .model_sd3 import StableDiffusion3
        return StableDiffusion3(cfg)
    return StableDiffusion(cfg)


def build_model(cfg, device="cpu", dtype=torch.float32, seed=0):
    """A randomly initialised model (for tests and for training from scratch)."""
    torch.manual_seed(seed)
    return new_model(cfg).to(device=device, dtype=dtype)


def save_checkpoint(model, path, metadata=None):
    """Write the official single-file layout; our config goes into the metadata so it loads without guessing.
    T5's tied input embedding is written once, as `shared.weight`, as the official files hold it (rule 4 reads it
    back under both names)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    shared, embed = SD3_TEXT["t5xxl"] + "shared.weight", SD3_TEXT["t5xxl"] + "encoder.embed_tokens.weight"
    if embed in state and shared in state and torch.equal(state[embed], state[shared]):
        del state[embed]
    meta = {"minisd_config": model.cfg.to_json(), **(metadata or {})}
    tmp = Path(str(path) + ".partial")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
