"""A judge for the shapes world (tools/testbed/shapes.py): which named (colour, shape) objects does an image show?

No learned weights: colour segmentation against the known palette, connected components, then the shape
from six geometric features of each component, matched to the nearest prototype measured on renders.
With real SD weights the shapes world does not apply; plug in any object detector through the `Judge`
protocol (a callable (image, objects) -> list[bool]) and the evaluator works unchanged.

    python -m tools.testbed.judge measure --n 500 --degrade
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Protocol
import argparse
import io
import itertools

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull

from tools.testbed import shapes

PALETTE = np.array(list(shapes.COLOURS.values()), dtype=np.float32)  # (C, 3)
PALETTE_NAMES = list(shapes.COLOURS)


class Judge(Protocol):
    """Anything that says, for each named object, whether the image shows it."""

    def __call__(self, image: np.ndarray, objects: list) -> list:
        ...


class Detection(NamedTuple):
    colour: str
    shape: str     # one of shapes.SHAPES, or "unknown" when no prototype is close
    bbox: tuple    # (x0, y0, x1, y1), pixels, x1/y1 exclusive
    area: int      # pixels


@dataclass
class Binding:
    """One named object, as an attribute-binding evaluation sees it."""
    present: bool              # the right colour on the right shape
    shape_other_colour: bool   # its shape appears, in some other colour
    colour_other_shape: bool   # its colour appears, on some other shape


@dataclass(frozen=True)
class JudgeConfig:
    max_colour_dist: float = 100.0  # RGB distance to the nearest palette colour; beyond it a pixel is no object
    min_chroma: float = 70.0        # max - min of RGB: backgrounds are near grey, anti-aliased rims are washed out
    min_area: float = 0.003         # fraction of the image: 49 px at 128; the smallest star covers ~300
    max_shape_dist: float = 6.0     # in feature-scale units; farther from every prototype means "unknown"


# ----------------------------------------------------------------------------------------------------------
# segmentation

def colour_labels(image, config=JudgeConfig()):
    """Per pixel: index into PALETTE, or -1 for background and for pixels that are no palette colour."""
    img = image.astype(np.float32)
    dist = np.linalg.norm(img[:, :, None, :] - PALETTE, axis=-1)  # (H, W, C)
    label = dist.argmin(-1)
    chroma = img.max(-1) - img.min(-1)
    label[(dist.min(-1) > config.max_colour_dist) | (chroma < config.min_chroma)] = -1
    return label


def components(image, config=JudgeConfig()):
    """Yield (colour name, boolean mask) for each blob of one palette colour."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    labels = colour_labels(image, config)
    min_area = config.min_area * image.shape[0] * image.shape[1]
    for c, name in enumerate(PALETTE_NAMES):
        lab, n = ndimage.label(labels == c)
        for i in range(1, n + 1):
            blob = lab == i
            # an edge fading into the background can pass close to a neighbouring colour (orange into white
            # passes yellow) and leave a thin rim of it: rims vanish under one erosion, objects do not.
            # An opening would drop the rims too, but it also blunts the star's tips.
            if blob.sum() < min_area or ndimage.binary_erosion(blob).sum() < 0.3 * blob.sum():
                continue
            yield name, ndimage.binary_fill_holes(blob)


# ----------------------------------------------------------------------------------------------------------
# shape features

FEATURES = ("fill", "solidity", "radial_2", "radial_3", "radial_4", "radial_5")
# how far each feature may wander under blur and small sizes: distances are counted in these units
SCALES = np.array([0.06, 0.05, 0.05, 0.05, 0.05, 0.05])


def radial_profile(mask, n_angles=64):
    """(n_angles,) distance from the centroid to the edge along evenly spaced rays, sub-pixel via bilinear
    sampling of the mask. Every shape of the world is star-shaped around its centroid, so one crossing per ray."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    radii = np.arange(0, np.hypot(ys - cy, xs - cx).max() + 2, 0.25)
    angles = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    rows = cy + np.sin(angles)[:, None] * radii  # (n_angles, n_radii)
    cols = cx + np.cos(angles)[:, None] * radii
    inside = ndimage.map_coordinates(mask.astype(np.float32), [rows, cols], order=1) >= 0.5
    return np.where(inside, radii, 0).max(1)


def features(mask):
    """Six numbers that tell the shapes apart without caring about size or position:
    fill      area / bounding-box area     (square 1, circle 0.78, heart 0.64, cross 0.58, triangle 0.53, star 0.43)
    solidity  area / convex-hull area      (only star, cross and heart have dents)
    radial_k  strength of the k-fold ripple of the radial profile, relative to the mean radius: the corner
              count, read robustly (triangle 3, square and cross 4, star 5, heart mostly 2 and 3, circle none)"""
    ys, xs = np.nonzero(mask)
    area = len(xs)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    # the hull of the pixels' corners, so a filled axis-aligned square has solidity exactly 1
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
    hull = ConvexHull(corners).volume  # in 2-D, "volume" is the area
    r = radial_profile(mask)
    ripple = 2 * np.abs(np.fft.rfft(r / r.mean())) / len(r)  # amplitude of each harmonic
    return np.array([area / (w * h), area / hull, *ripple[2:6]])


@lru_cache(maxsize=None)
def prototypes():
    """(S, F) mean features of each shape in shapes.SHAPES, measured on renders at a few sizes, sharp and
    blurred (an autoencoder blurs: fattened star tips must still be closer to "star" than to anything else).
    Measured rather than written down, so changing a polygon in shapes.py keeps the judge in step."""
    rows = []
    for shape in shapes.SHAPES:
        feats = []
        for size, blur in itertools.product((0.19, 0.26, 0.33, 0.40), (0.0, 1.0)):
            scene = shapes.Scene([shapes.Obj("blue", shape, size, 0.5, 0.5)])
            image = shapes.render(scene, 128)
            if blur:
                image = ndimage.gaussian_filter(image, sigma=(blur, blur, 0))
            (_, mask), = components(image)
            feats.append(features(mask))
        rows.append(np.mean(feats, 0))
    return np.stack(rows)


def classify(mask, config=JudgeConfig()):
    """The nearest prototype's shape name, or 'unknown' when none is within config.max_shape_dist."""
    d = np.linalg.norm((prototypes() - features(mask)) / SCALES, axis=1)
    i = int(d.argmin())
    return shapes.SHAPES[i] if d[i] <= config.max_shape_dist else "unknown"


# ----------------------------------------------------------------------------------------------------------
# the judge

def detect(image, config=JudgeConfig()):
    """Every object the image shows, as Detection(colour, shape, bbox, area), largest first."""
    out = []
    for colour, mask in components(image, config):
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        out.append(Detection(colour, classify(mask, config), bbox, int(mask.sum())))
    return sorted(out, key=lambda d: -d.area)


def _check_objects(objects):
    objects = [tuple(o) for o in objects]
    for c, s in objects:
        if c not in shapes.COLOURS or s not in shapes.SHAPES:
            raise ValueError(f"unknown object {(c, s)}; colours {list(shapes.COLOURS)}, shapes {list(shapes.SHAPES)}")
    return objects


def check_binding(image, objects, config=JudgeConfig()):
    """For each named (colour, shape): a Binding saying whether it is present, and whether its shape
    or its colour shows up on something else (a binding error when the object itself is absent)."""
    objects = _check_objects(objects)
    found = {(d.colour, d.shape) for d in detect(image, config)}
    return [Binding(present=(c, s) in found,
                    shape_other_colour=any(fs == s and fc != c for fc, fs in found),
                    colour_other_shape=any(fc == c and fs != s for fc, fs in found))
            for c, s in objects]


def judge(image, objects, config=JudgeConfig(), found=None):
    """[bool] per named (colour, shape): does the image show it? (found: detect(image)'s result, if at hand)"""
    objects = _check_objects(objects)
    found = {(d.colour, d.shape) for d in (detect(image, config) if found is None else found)}
    return [o in found for o in objects]


FAILURE_TYPES = ("presence", "strict", "omission", "wrong_shape", "colour_swap", "wrong_colour", "extra")


def failure_types(image, objects, config=JudgeConfig(), min_object=0.5, found=None):
    """{type: bool} for one image of a prompt naming (colour, shape) objects:
    presence     every named shape is there, in any colour (as many of each as named): the paper's detection
    strict       every named object is there in its colour (judge())
    omission     fewer objects than named
    wrong_shape  a named shape is missing although as many objects as named were drawn
    colour_swap  every shape is there, not every colour, and a named shape wears another named object's colour
    wrong_colour every shape is there, not every colour, and no such swap
    extra        more objects than named
    Objects are counted when they are object-sized (ColourJudge's rule: at least `min_object` of the smallest
    object the world draws); a two-coloured shape counts as two. Presence and strict look at every detection."""
    objects = _check_objects(objects)
    found = detect(image, config) if found is None else found
    shapes_seen = [d.shape for d in found]
    named_shapes = [s for _, s in objects]
    presence = all(shapes_seen.count(s) >= named_shapes.count(s) for s in set(named_shapes))
    pairs = {(d.colour, d.shape) for d in found}
    strict = all(o in pairs for o in objects)
    swapped = {(c, s) for _, s in objects for c, _ in objects if (c, s) not in objects}
    count = sum(d.area >= min_object * smallest_object_area() * image.shape[0] * image.shape[1] for d in found)
    colour_wrong = presence and not strict
    return dict(presence=presence, strict=strict, omission=count < len(objects),
                wrong_shape=not presence and count >= len(objects),
                colour_swap=colour_wrong and bool(swapped & pairs),
                wrong_colour=colour_wrong and not swapped & pairs, extra=count > len(objects))


def exact(types):
    """failure_types' verdict that the image is the prompt: every named object in its colour (strict) and nothing
    else (no extra object). The evaluation's "exact" column and the CLIP score's check both read it here."""
    return types["strict"] and not types["extra"]


class ShapesJudge:
    """The shapes-world implementation of the Judge protocol; `failures` says how an image fails its prompt."""

    def __init__(self, config=JudgeConfig()):
        self.config = config

    def __call__(self, image, objects):
        return judge(image, objects, self.config, self._detect(image))

    def failures(self, image, objects):
        return failure_types(image, objects, self.config, found=self._detect(image))

    def _detect(self, image):
        """detect(image), kept for the last image: the benchmark asks both questions of each image."""
        image = np.asarray(image)
        key = (image.shape, hash(image.tobytes()))
        if getattr(self, "_last", (None,))[0] != key:
            self._last = (key, detect(image, self.config))
        return self._last[1]


# ----------------------------------------------------------------------------------------------------------
# measuring the judge itself

@lru_cache(maxsize=None)
def smallest_object_area():
    """The area, as a fraction of the image, of the smallest object the world draws: each shape rendered at the
    smallest size of shapes.SIZE_RANGE, measured like prototypes() so it follows shapes.py. About 0.017 (the
    star: 279 px at 128 px; objects span about 280 to 2,700 px there)."""
    areas = []
    for shape in shapes.SHAPES:
        image = shapes.render(shapes.Scene([shapes.Obj("blue", shape, shapes.SIZE_RANGE[0], 0.5, 0.5)]), 128)
        areas += [mask.sum() for _, mask in components(image)]
    return min(areas) / 128 ** 2


class ColourJudge:
    """A lenient judge: an object counts as present when an object-sized blob of its colour is there, whatever its
    shape. A model that draws rough shapes (the tiny shipped one) is then still judged on object neglect: a named
    object whose colour is missing altogether was neglected.

    Object-sized: at least `min_object` of the smallest object the world draws (smallest_object_area(), a fraction
    of the image, so it scales with the image size). JudgeConfig's min_area (49 px at 128) only drops noise; a
    speck of a colour that size is no object, and counting it would call a neglected object present."""

    def __init__(self, config=JudgeConfig(), min_object=0.5):
        self.config = config
        self.min_area = min_object * smallest_object_area()

    def __call__(self, image, objects):
        _check_objects(objects)
        size = image.shape[0] * image.shape[1]
        colours = {d.colour for d in detect(image, self.config) if d.area >= self.min_area * size}
        return [c in colours for c, _ in objects]


def degrade(image, rng, blur=1.0, jpeg_quality=40, noise=3.0):
    """Gaussian blur, a JPEG round trip and a little noise: a stand-in for a lossy autoencoder's smudging."""
    img = ndimage.gaussian_filter(image.astype(np.float32), sigma=(blur, blur, 0))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=jpeg_quality)
    img = np.asarray(Image.open(buf), dtype=np.float32) + rng.normal(0, noise, image.shape)
    return np.clip(img.round(), 0, 255).astype(np.uint8)


def _negatives(present, rng):
    """Absent objects to ask about: for each present one, its shape in another colour and its colour on
    another shape (the hard, binding-style negatives), plus one object chosen at random."""
    allobjs = list(itertools.product(shapes.COLOURS, shapes.SHAPES))
    absent = [o for o in allobjs if o not in present]
    negs = set()
    for c, s in present:
        same_shape = [o for o in absent if o[1] == s]
        same_colour = [o for o in absent if o[0] == c]
        negs.add(same_shape[rng.integers(len(same_shape))])
        negs.add(same_colour[rng.integers(len(same_colour))])
    negs.add(absent[rng.integers(len(absent))])
    return sorted(negs)


def vae_roundtrip(checkpoint):
    """image uint8 -> the same image encoded and decoded by the checkpoint's VAE (posterior mean)."""
    import torch
    from minisd.loading import load_model
    model = load_model(checkpoint)

    @torch.no_grad()
    def roundtrip(image):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        z = model.first_stage_model.encode(x * 2 - 1).mean * model.cfg.vae.scale_factor
        return (model.decode_latents(z)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return roundtrip


def measure(n=500, seed=10_000, size=128, degraded=False, judge_fn=None, transform=None):
    """Judge n fresh scenes with known contents: dict(accuracy, false_positive_rate, per_shape accuracy).

    Scenes may hold held-out pairs (the benchmark renders them); seed should differ from training seeds.
    transform: applied to each render first (e.g. vae_roundtrip(checkpoint))."""
    judge_fn = judge_fn or ShapesJudge()
    rng = np.random.default_rng(seed)
    hits, total, fps, negs_total = 0, 0, 0, 0
    per_shape = {s: [0, 0] for s in shapes.SHAPES}
    for _ in range(n):
        scene = shapes.sample_scene(rng, exclude_held_out=False)
        image = shapes.render(scene, size)
        if transform is not None:
            image = transform(image)
        if degraded:
            image = degrade(image, rng)
        present = [o.key for o in scene.objects]
        negs = _negatives(present, rng)
        verdict = judge_fn(image, present + negs)
        for (c, s), ok in zip(present, verdict):
            per_shape[s][0] += ok
            per_shape[s][1] += 1
        hits += sum(verdict[: len(present)])
        total += len(present)
        fps += sum(verdict[len(present):])
        negs_total += len(negs)
    return dict(accuracy=hits / total, false_positive_rate=fps / negs_total, objects=total, negatives=negs_total,
                per_shape={s: h / max(t, 1) for s, (h, t) in per_shape.items()})


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.testbed.judge", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pm = sub.add_parser("measure", help="judge fresh scenes with known contents, print accuracy")
    pm.add_argument("--n", type=int, default=500)
    pm.add_argument("--seed", type=int, default=10_000, help="keep it apart from the training seeds")
    pm.add_argument("--size", type=int, default=128)
    pm.add_argument("--degrade", action="store_true", help="also measure on blurred + JPEG-compressed renders")
    pm.add_argument("--vae", metavar="CHECKPOINT", help="also measure on renders encoded and decoded by this VAE")
    pm.add_argument("--colour", action="store_true", help="measure the lenient ColourJudge instead")
    args = p.parse_args(argv)
    judge_fn = ColourJudge() if args.colour else ShapesJudge()
    runs = [("clean", False, None)] + ([("degraded", True, None)] if args.degrade else [])
    if args.vae:
        runs.append(("vae", False, vae_roundtrip(args.vae)))
    for name, degraded, transform in runs:
        r = measure(args.n, args.seed, args.size, degraded, judge_fn, transform)
        print(f"{name:8s} per-object accuracy {r['accuracy']:.3f} ({r['objects']} objects), "
              f"false-positive rate {r['false_positive_rate']:.3f} ({r['negatives']} absent objects asked)")
        print("         per shape: " + ", ".join(f"{s} {a:.3f}" for s, a in r["per_shape"].items()))


if __name__ == "__main__":
    main()
