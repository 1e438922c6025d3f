"""Download the official Stable Diffusion weights, one safetensors file each, into weights/.

    python -m tools.fetch_weights sd15            # Stable Diffusion 1.5, about 4.3 GB
    python -m tools.fetch_weights sd21 --dest /data/weights
    python -m tools.fetch_weights sdxl            # SDXL base 1.0, about 6.9 GB
    python -m tools.fetch_weights sd3.5-medium    # SD 3.5 Medium and its text encoders, about 16 GB

SD 3 / 3.5 come as several files: the single file (MMDiT and VAE) and, from the same repository,
text_encoders/clip_l.safetensors, clip_g.safetensors and t5xxl_fp16.safetensors, plus T5's tokenizer
(tokenizer_3/spiece.model, from the diffusers-format repository), each kept at its path in the repository under
--dest. The three models share their text encoders and tokenizer: one already there is not downloaded again. The
last line printed is the command that samples with them.

The files come from the Hugging Face Hub through huggingface_hub (pip install huggingface_hub). These
repositories have moved before (SD 1.5 left runwayml/) and may move again: if a download says the repository is
not found, look the file up on the Hub and pass it with --repo and --file. Some repositories ask you to accept a
licence first (all of SD 3's do); then log in with `hf auth login`. minisd loads the file as is:
python -m minisd.sample --checkpoint weights/<file>.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors",
             "Stable Diffusion 1.5, EMA weights, 512 px"),
    "sd21": ("stabilityai/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors",
             "Stable Diffusion 2.1 base, EMA weights, 512 px"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors",
             "Stable Diffusion XL base 1.0, 1024 px"),
    "sd3-medium": ("stabilityai/stable-diffusion-3-medium", "sd3_medium.safetensors",
                   "Stable Diffusion 3 Medium (MMDiT and VAE), 1024 px"),
    "sd3.5-medium": ("stabilityai/stable-diffusion-3.5-medium", "sd3.5_medium.safetensors",
                     "Stable Diffusion 3.5 Medium (MMDiT and VAE), 1024 px"),
    "sd3.5-large": ("stabilityai/stable-diffusion-3.5-large", "sd3.5_large.safetensors",
                    "Stable Diffusion 3.5 Large (MMDiT and VAE), 1024 px"),
}
# SD 3's other files: the text encoders from the model's own repository (--repo moves them with the single file),
# and T5's tokenizer, which no single-file repository has, from the diffusers-format one
SD3_TEXT_ENCODERS = {"--clip-l": "text_encoders/clip_l.safetensors", "--clip-g": "text_encoders/clip_g.safetensors",
                     "--t5": "text_encoders/t5xxl_fp16.safetensors"}
SD3_TOKENIZER = "tokenizer_3/spiece.model"
SD3_TOKENIZER_REPO = {"sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
                      "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
                      "sd3.5-large": "stabilityai/stable-diffusion-3.5-large"}


class FetchError(Exception):
    pass


def explain(e, repo, filename):
    """One line for each way a download fails. Errors are told apart by class name, so that this works across
    huggingface_hub versions (the classes have moved between modules)."""
    kinds = {c.__name__ for c in type(e).__mro__}
    where = f"{filename} from {repo}"
    if "GatedRepoError" in kinds:
        return f"{repo} asks you to accept its licence on the Hub and to log in (hf auth login) first"
    if "RepositoryNotFoundError" in kinds:
        return f"repository {repo} not found on the Hub (it may have moved: pass --repo)"
    if kinds & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        return (f"cannot download {where}: the Hugging Face Hub is not reachable (no internet, or HF_HUB_OFFLINE "
                f"is set) and the file is not in the local cache")
    if "EntryNotFoundError" in kinds:
        return f"{repo} has no file {filename} (it may have moved: pass --file)"
    text = str(e).strip()
    return f"cannot download {where}: {type(e).__name__}: {text.splitlines()[0] if text else 'no message'}"


def fetch(repo, filename, dest):
    """Download `filename` of `repo` into `dest` (nothing happens if it is already there) -> its path.
    Every way it can fail becomes a FetchError with a one-line message."""
    dest = Path(dest)
    if (dest / filename).is_file():
        return dest / filename
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FetchError("huggingface_hub is not installed: pip install huggingface_hub") from None
    from huggingface_hub.utils import logging
    logging.set_verbosity_error()  # its retry warnings would bury the one line that says what went wrong
    dest.mkdir(parents=True, exist_ok=True)
    print(f"downloading {filename} from {repo} into {dest}", flush=True)
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, local_dir=dest))
    except Exception as e:  # the Hub's errors and the network library's own (a lost connection): never a traceback
        raise FetchError(explain(e, repo, filename)) from None


def fetch_sd3(model, repo, filename, dest):
    """The single file, its three text encoders and T5's tokenizer -> the command line that samples with them."""
    path = fetch(repo, filename, dest)
    flags = [f"{flag} {fetch(repo, f, dest)}" for flag, f in SD3_TEXT_ENCODERS.items()]
    # a tokenizer_3/ beside the checkpoint is where minisd looks for it; the flag says so all the same
    flags.append(f"--t5-tokenizer {fetch(SD3_TOKENIZER_REPO[model], SD3_TOKENIZER, dest)}")
    return path, f"python -m minisd.sample --checkpoint {path} {' '.join(flags)} --prompt \"...\""


def main(argv=None):
    sd3 = (f"  SD 3 models also: {', '.join(SD3_TEXT_ENCODERS.values())} from the same repository and "
           f"{SD3_TOKENIZER} from {', '.join(sorted(set(SD3_TOKENIZER_REPO.values())))}")
    models = "\n".join(f"  {k}  {d}\n        {r}, file {f}" for k, (r, f, d) in MODELS.items()) + "\n" + sd3
    ap = argparse.ArgumentParser(prog="python -m tools.fetch_weights", description=__doc__,
                                 epilog=f"models (these repositories may move):\n{models}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=list(MODELS), help="which model (see below)")
    ap.add_argument("--dest", default=str(ROOT / "weights"), help="folder to write into (default: weights/)")
    ap.add_argument("--repo", default=None, help="another Hub repository (if the official one has moved; for SD 3 "
                                                 "its text encoders come from it too)")
    ap.add_argument("--file", default=None, help="another file name in the repository (the single file)")
    args = ap.parse_args(argv)
    repo, filename, _ = MODELS[args.model]
    repo, filename = args.repo or repo, args.file or filename
    try:
        if args.model in SD3_TOKENIZER_REPO:
            path, command = fetch_sd3(args.model, repo, filename, args.dest)
        else:
            path, command = fetch(repo, filename, args.dest), None
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(path)
    if command:
        print(command)
    return path


if __name__ == "__main__":
    main()
