"""Images on disk: where they go (checked before any work), written whole or not at all, with their settings in
AUTOMATIC1111's format (a PNG `parameters` chunk, or the EXIF UserComment of a JPEG or WebP)."""
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}   # --out FILE: by its extension


class UsageError(Exception):
    """A request that cannot be carried out as asked: the command line prints it as one error line."""


def read_image(path, flag):
    """An image file (image-to-image's --init-image) as an RGB PIL image, or a one-line UsageError naming `flag`."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {path} is a folder; it names an image file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{flag} {path} is not an image that can be read ({str(e).splitlines()[0]})") from None


def parameters_text(prompt, negative, settings):
    """The `parameters` chunk: prompt, negative prompt, then `Key: value` pairs on one line."""
    def value(v):
        v = str(v)
        return f'"{v}"' if re.search(r"[,:\"]", v) else v
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {value(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def nearest_existing(path):
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return p


def check_writable(folder, flag):
    """`folder` (there already, or to be made) can take new files: probe its nearest existing ancestor."""
    base = nearest_existing(folder)
    if not base.is_dir():
        raise UsageError(f"{flag} {folder}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".minisd-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot write in {base} ({e.strerror})") from None


def output_paths(out, count, seeds, overwrite):
    """A folder gets numbered PNGs after the highest number already there, so nothing is ever replaced; a path
    ending in .png, .jpg/.jpeg or .webp is one image in that format, refused if it exists (unless --overwrite).
    Checks that the files can be written; makes no folder (save_image does, when there is something to save)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in FORMATS and not out.is_dir():
        if count != 1:
            raise UsageError(f"--out {out} names one file but {count} images were asked for; give a folder")
        if out.exists() and not overwrite:
            raise UsageError(f"{out} exists; choose another path or pass --overwrite")
        check_writable(out.parent, "--out")
        return [out]
    if suffix and suffix in Image.registered_extensions() and not out.is_dir():
        raise UsageError(f"--out {out}: images are written as {', '.join(FORMATS)} (by the file's extension), "
                         f"or as numbered PNGs into a folder; not as {suffix}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; name a .png/.jpg/.webp file or a folder")
    check_writable(out, "--out")
    used = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d+)-", p.name))] if out.is_dir() else []
    start = max(used, default=-1) + 1
    return [out / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def make_dirs(folder, made):
    """mkdir -p that remembers what it made (in `made`), so that a failed run can take its empty folders back."""
    missing, p = [], Path(folder)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        made.append(d)


def remove_empty(made):
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:   # not empty: it holds what this run finished
            pass


def save_image(image, path, text, made):
    """Write `image` in the format of `path`'s extension with the settings text: a PNG `parameters` chunk, or for
    JPEG/WebP the EXIF UserComment (where AUTOMATIC1111 puts it). Written under a temporary name and renamed, so a
    file is there whole or not at all."""
    fmt = FORMATS.get(path.suffix.lower(), "PNG")
    make_dirs(path.parent, made)
    if fmt == "PNG":
        info = PngInfo()
        info.add_text("parameters", text)
        options = {"pnginfo": info}
    else:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")   # Exif IFD, UserComment
        options = {"exif": exif, "quality": 95}
    part = path.with_name(f".{path.name}.part")
    try:
        image.convert("RGB").save(part, format=fmt, **options)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
