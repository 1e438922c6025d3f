"""A synthetic world of coloured shapes, where "is every object of the prompt in the image?" has an exact answer.

Attention Regulation (Zhang et al., 2024, "Attention Regulation: ... for text-to-image diffusion models")
and Attend-and-Excite (Chefer et al., 2023) fight *object neglect*: a prompt names two things and the image
shows one. Measuring that on real Stable Diffusion needs a learned detector; here the world is small enough
that tools/testbed/judge.py can check it with plain geometry. A tiny SD trained on these scenes never sees the
held-out pairs together, so the benchmark prompts ask it to compose, as real SD must.

Coordinates and sizes of objects are fractions of the image side, so one scene renders at any resolution.

    python -m tools.testbed.shapes prompts --n 120 --out prompts.jsonl
    python -m tools.testbed.shapes grid --out grid.png
"""
from dataclasses import dataclass, field
from functools import lru_cache
import argparse
import itertools
import json
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")

# Plain saturated colours, far from each other and from the backgrounds, so that an autoencoder's smudging
# moves a pixel less than half the way to another palette entry.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}

# Light, nearly grey: no background is ever mistaken for an object colour.
BACKGROUNDS = {
    "white": (255, 255, 255),
    "light grey": (228, 228, 228),
    "beige": (245, 238, 220),
    "blue-grey": (222, 230, 240),
}

SIZE_RANGE = (0.22, 0.40)   # the larger side of an object: 28..52 px at 128 px
GAP = 0.04                  # minimum free space between two objects' boxes (5 px at 128)
N_HELD_OUT = 120
HELD_OUT_SEED = 1234
SUPERSAMPLE = 4             # draw at 4x and box-filter down: anti-aliased edges


@dataclass
class Obj:
    colour: str
    shape: str
    size: float   # larger side of the shape, as a fraction of the image side
    cx: float     # centre, fractions of the image side
    cy: float

    @property
    def key(self):
        return (self.colour, self.shape)


@dataclass
class Scene:
    objects: list = field(default_factory=list)
    background: str = "white"
    gradient: float = 0.0   # top-to-bottom brightness change in RGB levels: a subtle light falloff


# ----------------------------------------------------------------------------------------------------------
# geometry: every shape is a polygon in a unit box, centred on 0, larger side exactly 1

def _regular(n, r=1.0, phase=-math.pi / 2):
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _star(points=5, inner=0.45):
    # inner = 0.45 rather than the pentagram's 0.38: fatter tips survive blur and the judge still sees a star
    outer, inn = _regular(points), _regular(points, inner, -math.pi / 2 + math.pi / points)
    return np.stack([outer, inn], 1).reshape(-1, 2)


def _cross(arm=0.36):
    a, b = arm / 2, 0.5
    return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                     (-a, a), (-b, a), (-b, -a), (-a, -a)])


def _heart(n=96):
    # the classic parametric heart; y is negated because image rows grow downwards
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], 1)


def _normalise(poly):
    """Centre the bounding box on 0 and scale its larger side to 1."""
    lo, hi = poly.min(0), poly.max(0)
    return (poly - (lo + hi) / 2) / (hi - lo).max()


POLYGONS = {
    "circle": _normalise(_regular(96)),
    "square": _normalise(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float)),
    "triangle": _normalise(_regular(3)),
    "star": _normalise(_star()),
    "cross": _normalise(_cross()),
    "heart": _normalise(_heart()),
}
assert set(POLYGONS) == set(SHAPES)


def _check_obj(o):
    if o.colour not in COLOURS:
        raise ValueError(f"unknown colour {o.colour!r}; known: {sorted(COLOURS)}")
    if o.shape not in SHAPES:
        raise ValueError(f"unknown shape {o.shape!r}; known: {list(SHAPES)}")


def render(scene, size=128):
    """Scene -> np.uint8 (size, size, 3), anti-aliased by drawing at SUPERSAMPLE x and box-filtering down."""
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; known: {sorted(BACKGROUNDS)}")
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _check_obj(o)
        pts = POLYGONS[o.shape] * o.size * big + np.array([o.cx, o.cy]) * big
        draw.polygon([tuple(p) for p in pts], fill=COLOURS[o.colour])
    out = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32)
    if scene.gradient:
        # shade background and objects alike, as light would
        out += np.linspace(-0.5, 0.5, size, dtype=np.float32)[:, None, None] * scene.gradient
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def object_masks(scene, res, size=128):
    """Each object's share of every cell of a res x res grid over the image: float32 (objects, res, res), in the
    scene's order. The training stage that grounds cross-attention (tools/testbed/train.py) uses it at the latent
    grid."""
    out = []
    for o in scene.objects:
        _check_obj(o)
        img = Image.new("L", (size, size), 0)
        pts = POLYGONS[o.shape] * o.size * size + np.array([o.cx, o.cy]) * size
        ImageDraw.Draw(img).polygon([tuple(p) for p in pts], fill=255)
        m = np.asarray(img, dtype=np.float32) / 255
        out.append(m.reshape(res, size // res, res, size // res).mean((1, 3)))
    return np.stack(out) if out else np.zeros((0, res, res), np.float32)


# ----------------------------------------------------------------------------------------------------------
# held-out pairs and sampling

def all_pairs():
    """Every unordered pair of two objects with distinct colours and distinct shapes, in a fixed order."""
    objs = list(itertools.product(COLOURS, SHAPES))
    return [(a, b) for a, b in itertools.combinations(objs, 2) if a[0] != b[0] and a[1] != b[1]]


def _pair_key(a, b):
    return frozenset((tuple(a), tuple(b)))


def held_out_pairs():
    """The fixed list of N_HELD_OUT pairs that no training scene ever shows together."""
    return list(_held_out())


@lru_cache(maxsize=None)
def _held_out():
    # greedy over a seeded shuffle of all_pairs(), with a cap on how often one object may be held out, so
    # every (colour, shape) keeps most of its partners in training and is held out about equally often
    pairs = all_pairs()
    order = np.random.default_rng(HELD_OUT_SEED).permutation(len(pairs))
    cap = math.ceil(2 * N_HELD_OUT / (len(COLOURS) * len(SHAPES))) + 1
    count, chosen = {}, []
    for i in order:
        a, b = pairs[i]
        if count.get(a, 0) < cap and count.get(b, 0) < cap:
            chosen.append((a, b))
            count[a], count[b] = count.get(a, 0) + 1, count.get(b, 0) + 1
        if len(chosen) == N_HELD_OUT:
            return tuple(chosen)
    raise RuntimeError(f"the cap of {cap} per object left fewer than {N_HELD_OUT} pairs; raise it")


@lru_cache(maxsize=None)
def _held_out_set():
    return frozenset(_pair_key(a, b) for a, b in held_out_pairs())


def contains_held_out(keys):
    """True if any two of the (colour, shape) keys form a held-out pair."""
    held = _held_out_set()
    return any(_pair_key(a, b) in held for a, b in itertools.combinations(keys, 2))


def _place(rng, sizes, tries=200):
    """Rejection-sample centres so that the objects' boxes stay GAP apart; None if it keeps failing.
    Shapes are never rotated, so each one lies inside its box and separate boxes mean no overlap."""
    placed = []
    for s in sizes:
        for _ in range(tries):
            c = rng.uniform(s / 2 + 0.02, 1 - s / 2 - 0.02, size=2)
            if all(np.abs(c - p).max() >= (s + q) / 2 + GAP for p, q in placed):
                placed.append((c, s))
                break
        else:
            return None
    return [c for c, _ in placed]


def sample_scene(rng, n_objects=None, exclude_held_out=True, keys=None):
    """A random scene of 1-3 distinct (colour, shape) objects that do not overlap.

    exclude_held_out: reject object sets containing a held-out pair (the training distribution).
    keys: draw exactly these (colour, shape) objects instead of random ones (the benchmark's renders)."""
    if keys is not None:
        n_objects = len(keys)
    if n_objects is None:
        n_objects = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    if not 1 <= n_objects <= 3:
        raise ValueError(f"n_objects must be 1, 2 or 3, got {n_objects}")
    for _ in range(1000):
        if keys is None:
            objs = [(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))) for _ in range(n_objects)]
            if len(set(objs)) < n_objects or (exclude_held_out and contains_held_out(objs)):
                continue
        else:
            objs = [tuple(k) for k in keys]
        sizes = rng.uniform(*SIZE_RANGE, size=n_objects)
        centres = _place(rng, sizes)
        if centres is None:
            continue
        return Scene([Obj(c, s, float(z), float(p[0]), float(p[1])) for (c, s), z, p in zip(objs, sizes, centres)],
                     background=str(rng.choice(list(BACKGROUNDS))),
                     gradient=float(rng.uniform(-12, 12)) if rng.random() < 0.5 else 0.0)
    raise RuntimeError("could not place the objects; are they too large for the image?")


# ----------------------------------------------------------------------------------------------------------
# captions

TEMPLATES = {
    1: ["{0}", "a photo of {0}", "a picture of {0}", "{0} on a plain background"],
    2: ["{0} and {1}", "{0} next to {1}", "a photo of {0} with {1}", "a picture of {0} and {1}"],
    3: ["{0}, {1} and {2}", "a photo of {0}, {1} and {2}", "{0} with {1} and {2}"],
}


def phrase(colour, shape):
    """('orange', 'star') -> 'an orange star'."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


def caption_for(keys, rng, shuffle=True):
    """A caption naming exactly these (colour, shape) objects, with a random template; in a random order
    unless shuffle=False, which keeps the order of keys."""
    if shuffle:
        keys = [keys[i] for i in rng.permutation(len(keys))]
    template = TEMPLATES[len(keys)][rng.integers(len(TEMPLATES[len(keys)]))]
    return template.format(*[phrase(c, s) for c, s in keys])


def caption(scene, rng):
    return caption_for([o.key for o in scene.objects], rng)


def training_example(rng, size=128):
    """(image uint8 (size, size, 3), caption, [(colour, shape), ...]) from the training distribution."""
    scene = sample_scene(rng)
    return render(scene, size), caption(scene, rng), [o.key for o in scene.objects]


def benchmark_prompts(n=120, seed=0):
    """n two-object prompts, each naming one held-out pair: dict(prompt=..., objects=[(colour, shape), ...]).

    Goes through the held-out pairs in a seeded order; past N_HELD_OUT it starts over with fresh templates."""
    rng = np.random.default_rng(seed)
    pairs = held_out_pairs()
    out = []
    while len(out) < n:
        for i in rng.permutation(len(pairs))[: n - len(out)]:
            keys = [pairs[i][j] for j in rng.permutation(2)]
            # objects listed in the order the prompt names them, so token targets line up
            out.append(dict(prompt=caption_for(keys, rng, shuffle=False), objects=[list(k) for k in keys]))
    return out


# ----------------------------------------------------------------------------------------------------------
# command line

def _grid(rows=4, cols=6, size=128, seed=0):
    """Example training scenes with their captions underneath, for a person to look at."""
    rng = np.random.default_rng(seed)
    cell_h = size + 34
    sheet = Image.new("RGB", (cols * size, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k in range(rows * cols):
        img, text, _ = training_example(rng, size)
        x, y = (k % cols) * size, (k // cols) * cell_h
        sheet.paste(Image.fromarray(img), (x, y))
        words, lines = text.split(), [""]
        for w in words:  # wrap to the cell width, about 6 px per character with the default font
            if len(lines[-1]) + len(w) + 1 > size // 6:
                lines.append("")
            lines[-1] = (lines[-1] + " " + w).strip()
        draw.multiline_text((x + 2, y + size + 1), "\n".join(lines[:3]), fill=(0, 0, 0), spacing=0)
    return sheet


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.testbed.shapes", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prompts", help="write benchmark prompts (held-out pairs) as JSON lines")
    pp.add_argument("--n", type=int, default=120)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--out", required=True)
    pg = sub.add_parser("grid", help="render example training scenes with captions into one PNG")
    pg.add_argument("--out", required=True)
    pg.add_argument("--rows", type=int, default=4)
    pg.add_argument("--cols", type=int, default=6)
    pg.add_argument("--size", type=int, default=128)
    pg.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cmd == "prompts":
        with open(args.out, "w") as f:
            for row in benchmark_prompts(args.n, args.seed):
                f.write(json.dumps(row) + "\n")
        print(f"wrote {args.n} prompts to {args.out}")
    else:
        _grid(args.rows, args.cols, args.size, args.seed).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
