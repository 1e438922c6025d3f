"""TAESD: the layout loads the real weights strictly, and an encode -> decode round trip reconstructs a picture."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from minisd.taesd import TAESDDecoder, TAESDEncoder, load_taesd_decoder, load_taesd_encoder

SHARED = Path(os.environ.get("MINISD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
WEIGHTS = SHARED / "weights" / "taesd"
# Measured: 27.5 dB for the picture below with the real (bfloat16) weights; randomly initialised weights
# give about 5 dB. 24 dB leaves room for other torch versions / CPUs and still fails anything untrained.
MIN_PSNR = 24.0


def needs_weights():
    if not (WEIGHTS / "taesd_decoder.safetensors").is_file():
        pytest.skip(f"real TAESD weights are not at {WEIGHTS} (../shared absent); the package never ships them")


def picture(size=256, seed=0):
    """A synthetic test picture in [0, 1], (1, 3, size, size): colour gradients, flat shapes with hard edges,
    and a patch of fine noise texture."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + 4 * y)], -1)
    im = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    s = size / 256
    draw.ellipse([30 * s, 40 * s, 120 * s, 130 * s], fill=(220, 40, 40))
    draw.rectangle([140 * s, 60 * s, 230 * s, 150 * s], fill=(40, 60, 200))
    draw.polygon([(60 * s, 240 * s), (120 * s, 160 * s), (180 * s, 240 * s)], fill=(250, 220, 40))
    a = np.asarray(im).astype(np.float32) / 255
    noise = np.random.default_rng(seed).standard_normal((size // 4, size // 4, 3)).repeat(4, 0).repeat(4, 1)
    a[size * 5 // 8:, size * 7 // 10:] += 0.08 * noise[size * 5 // 8:, size * 7 // 10:]
    return torch.from_numpy(np.clip(a, 0, 1)).permute(2, 0, 1)[None]


def psnr(a, b):
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def round_trip(encoder, decoder, x):
    with torch.no_grad():
        latents = encoder.encode(x)  # images in [0, 1] -> scaled latents
        return latents, decoder.decode(latents)


def test_shapes_with_random_weights():
    torch.manual_seed(0)
    x = picture(64)
    latents, y = round_trip(TAESDEncoder(), TAESDDecoder(), x)
    assert latents.shape == (1, 4, 8, 8) and y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1


def test_layout_matches_the_checkpoint_keys():
    needs_weights()
    for model, name in [(TAESDEncoder(), "taesd_encoder"), (TAESDDecoder(), "taesd_decoder")]:
        state = load_file(str(WEIGHTS / f"{name}.safetensors"))
        ours = model.state_dict()
        assert set(ours) == set(state), name
        assert all(ours[k].shape == state[k].shape for k in state), name


def test_round_trip_psnr_real_weights():
    needs_weights()
    encoder = load_taesd_encoder(WEIGHTS)
    decoder = load_taesd_decoder(WEIGHTS / "taesd_decoder.safetensors", dtype=torch.float32)
    assert next(decoder.parameters()).dtype == torch.float32  # the files are bfloat16
    x = picture(256)
    latents, y = round_trip(encoder, decoder, x)
    assert latents.shape == (1, 4, 32, 32)
    # TAESD's latents are already on SD's scaled scale (VAE latent x 0.18215): about unit spread, not ~5
    assert 0.3 < latents.std() < 3, float(latents.std())
    measured = psnr(x, y)
    print(f"TAESD round trip PSNR: {measured:.2f} dB")
    assert measured > MIN_PSNR

    torch.manual_seed(0)
    small = picture(128)  # the same picture, smaller: untrained weights are as bad at any size
    untrained = psnr(small, round_trip(TAESDEncoder(), TAESDDecoder(), small)[1])
    assert untrained < MIN_PSNR - 10  # so the threshold does tell trained from untrained


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="taesd_decoder"):
        load_taesd_decoder(tmp_path)
    state = TAESDDecoder().state_dict()
    state["99.weight"] = state.pop("19.weight")
    save_file(state, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)missing: \['19.weight'\].*unexpected: \['99.weight'\]"):
        load_taesd_decoder(tmp_path / "renamed.safetensors")
    state = TAESDDecoder().state_dict()
    state["1.weight"] = torch.zeros(64, 8, 3, 3)
    save_file(state, str(tmp_path / "reshaped.safetensors"))
    with pytest.raises(ValueError, match=r"1.weight: file \(64, 8, 3, 3\)"):
        load_taesd_decoder(tmp_path / "reshaped.safetensors")


def test_encoder_file_is_refused_by_the_decoder():
    needs_weights()
    with pytest.raises(ValueError, match="missing"):
        load_taesd_decoder(WEIGHTS / "taesd_encoder.safetensors")
