"""Captioned shapes: the built-in dataset, rendered deterministically from a seed, and its scorer.

Each image shows one or two shapes (circle, square, triangle) in pure colours on a black background,
small or large, and for two shapes one of the relations "left of", "right of", "above", "below".
Captions describe the scene in varied wording: "a red circle to the left of a small blue square".

The "heldout" split holds scenes with at least one colour-shape pair from ``HELDOUT_PAIRS``; the
"train" split never shows those pairs, so a model that draws "a blue circle" has to combine
"blue" and "circle" from other examples (zero-shot evaluation).

The scorer (``read_scene``, ``matches``, ``accuracy``) reads shapes back from pixels with no learned
model: nearest palette colour per pixel, connected components per colour, then the shape from the
component's outline (triangles are bottom-heavy, squares fill their corners, circles do not), the size
from its extent and the relation from the centroids. Colours are few and far apart and shapes are at
least 9 pixels wide at 32 x 32 so that slightly blurry reconstructions from a small dVAE still read.
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import torch

from ..images import as_unit_float

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 9, "large": 14}  # side of the bounding box at 32 x 32 pixels
RELATIONS = ("left of", "right of", "above", "below")
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "circle")})

_BACKGROUND = (0, 0, 0)
_PALETTE = np.array([_BACKGROUND, *COLOURS.values()], dtype=np.float32) / 255.0  # index 0: background
_COLOUR_NAMES = list(COLOURS)
_SPLITS = {"train": 0, "heldout": 1}
_RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "on top of"),
    "below": ("below", "under", "beneath"),
}
_SINGLE_TEMPLATES = ("{a}", "a picture of {a}", "{a} on a black background", "an image of {a}")
_PAIR_TEMPLATES = ("{a} {rel} {b}", "a picture of {a} {rel} {b}", "an image of {a} {rel} {b}")


# ----------------------------------------------------------------------------------------------- scenes
def _phrase(obj: dict) -> str:
    size = f"{obj['size']} " if obj["size_said"] else ""
    return f"a {size}{obj['colour']} {obj['shape']}"


def _random_object(rng: np.random.Generator, pair=None) -> dict:
    colour, shape = pair if pair is not None else (
        _COLOUR_NAMES[rng.integers(len(_COLOUR_NAMES))], SHAPES[rng.integers(len(SHAPES))])
    return {"colour": colour, "shape": shape, "size": ("small", "large")[rng.integers(2)],
            "size_said": bool(rng.random() < 0.5)}


def _place(rng, lo: float, hi: float, w: int) -> int:
    """Integer start of a span of width ``w`` inside ``[lo, hi)`` (uniform)."""
    a, b = int(np.ceil(lo)), int(np.floor(hi)) - w
    return int(rng.integers(a, max(a, b) + 1))


def _make_scene(rng: np.random.Generator, heldout: bool, image_size: int) -> dict:
    s = image_size
    n = 1 + int(rng.random() < 0.6)
    while True:
        objs = [_random_object(rng) for _ in range(n)]
        pairs = [(o["colour"], o["shape"]) for o in objs]
        if heldout:
            k = int(rng.integers(n))  # force one held-out pair, keep the rest random
            pair = sorted(HELDOUT_PAIRS)[rng.integers(len(HELDOUT_PAIRS))]
            objs[k].update(colour=pair[0], shape=pair[1])
            pairs[k] = pair
        elif any(p in HELDOUT_PAIRS for p in pairs):
            continue
        if n == 2 and objs[0]["colour"] == objs[1]["colour"]:
            continue  # two shapes of one colour could touch and read as one; keep scenes unambiguous
        break
    widths = [max(3, round(SIZES[o["size"]] * s / 32)) for o in objs]
    m = max(1, s // 32)  # margin from the border
    if n == 1:
        w = widths[0]
        objs[0]["box"] = (_place(rng, m, s - m, w), _place(rng, m, s - m, w), w)
        return {"objects": objs, "relation": None}
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    # objs[0] RELATION objs[1]: put each in its half along the relation's axis, keep the other axis close
    first_low = relation in ("left of", "above")
    while True:
        along = [_place(rng, m, s / 2, widths[0]) if first_low else _place(rng, s / 2, s - m, widths[0]),
                 _place(rng, s / 2, s - m, widths[1]) if first_low else _place(rng, m, s / 2, widths[1])]
        across = [_place(rng, m, s - m, w) for w in widths]
        d_along = abs((along[0] + widths[0] / 2) - (along[1] + widths[1] / 2))
        d_across = abs((across[0] + widths[0] / 2) - (across[1] + widths[1] / 2))
        if d_across < 0.6 * d_along:
            break
    horizontal = relation in ("left of", "right of")
    for o, a, c, w in zip(objs, along, across, widths):
        o["box"] = (a, c, w) if horizontal else (c, a, w)
    return {"objects": objs, "relation": relation}


def caption_of(scene: dict, rng: np.random.Generator | None = None) -> str:
    """An English caption for ``scene`` (wording drawn from ``rng``; the first template when None)."""
    pick = (lambda seq: seq[0]) if rng is None else (lambda seq: seq[rng.integers(len(seq))])
    objs = scene["objects"]
    if len(objs) == 1:
        return pick(_SINGLE_TEMPLATES).format(a=_phrase(objs[0]))
    rel = pick(_RELATION_WORDS[scene["relation"]])
    return pick(_PAIR_TEMPLATES).format(a=_phrase(objs[0]), rel=rel, b=_phrase(objs[1]))


def render(scene: dict, image_size: int = 32) -> torch.Tensor:
    """Draw ``scene`` as a uint8 tensor (3, S, S). Boxes are (x0, y0, width) in pixels."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    s = image_size
    img = np.zeros((s, s, 3), dtype=np.uint8)
    yc, xc = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5  # pixel centres
    for o in scene["objects"]:
        x0, y0, w = o["box"]
        cx, cy = x0 + w / 2, y0 + w / 2
        inside_box = (xc >= x0) & (xc < x0 + w) & (yc >= y0) & (yc < y0 + w)
        if o["shape"] == "square":
            mask = inside_box
        elif o["shape"] == "circle":
            mask = (xc - cx) ** 2 + (yc - cy) ** 2 <= (w / 2) ** 2
        elif o["shape"] == "triangle":  # apex up, base on the bottom edge of the box
            mask = inside_box & (np.abs(xc - cx) <= (yc - y0) / w * (w / 2) + 0.25)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}; expected one of {SHAPES}")
        img[mask] = COLOURS[o["colour"]]
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


class ShapesDataset(torch.utils.data.Dataset):
    """``size`` captioned shape images of one split, a pure function of (split, index, image_size, seed).

    ``ds[i] -> (image, caption)``: uint8 tensor (3, S, S) and a str. ``ds.scene(i)`` is the scene the
    image was drawn from: ``{"objects": [{"colour", "shape", "size", "size_said", "box"}], "relation"}``
    where ``relation`` (or None for one shape) reads "objects[0] <relation> objects[1]".
    """

    def __init__(self, split: str = "train", size: int = 10000, image_size: int = 32, seed: int = 0):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self._cache: dict[int, tuple[dict, str]] = {}

    def __len__(self) -> int:
        return self.size

    def _item(self, i: int) -> tuple[dict, str]:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for a dataset of {self.size}")
        i %= self.size
        if i not in self._cache:
            rng = np.random.default_rng([self.seed, _SPLITS[self.split], i])
            scene = _make_scene(rng, self.split == "heldout", self.image_size)
            self._cache[i] = (scene, caption_of(scene, rng))
        return self._cache[i]

    def scene(self, i: int) -> dict:
        return self._item(i)[0]

    def caption(self, i: int) -> str:
        return self._item(i)[1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        scene, caption = self._item(i)
        return render(scene, self.image_size), caption

    def captions(self) -> list[str]:
        return [self.caption(i) for i in range(self.size)]

    def images(self) -> torch.Tensor:
        """All images as one uint8 tensor (N, 3, S, S)."""
        if self.size == 0:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return torch.stack([render(self.scene(i), self.image_size) for i in range(self.size)])


# ---------------------------------------------------------------------------------------------- parsing
_OBJ = r"(?:a|an|one) (?:(small|large) )?(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")"
_REL = {w: r for r, words in _RELATION_WORDS.items() for w in words}
_REL_RE = "|".join(sorted(map(re.escape, _REL), key=len, reverse=True))
_PAIR_RE = re.compile(rf"{_OBJ} ({_REL_RE}) {_OBJ}")
_SINGLE_RE = re.compile(_OBJ)


def parse_caption(caption: str) -> dict | None:
    """The scene (without boxes) a caption in this dataset's grammar describes, or None if it does not parse."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = " ".join(caption.lower().split())

    def obj(size, colour, shape):
        return {"colour": colour, "shape": shape, "size": size, "size_said": size is not None}

    m = _PAIR_RE.search(text)
    if m:
        g = m.groups()
        return {"objects": [obj(*g[0:3]), obj(*g[4:7])], "relation": _REL[g[3]]}
    found = list(_SINGLE_RE.finditer(text))
    if len(found) == 1:
        return {"objects": [obj(*found[0].groups())], "relation": None}
    return None


# ----------------------------------------------------------------------------------------------- scorer
def _as_float_hwc(image) -> np.ndarray:
    x = image.detach().cpu() if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"image must have shape (3, S, S), got {tuple(x.shape)}")
    return as_unit_float(x, "image").permute(1, 2, 0).numpy()


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, as boolean masks (label propagation by min-pooling)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        nxt = np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        nxt = np.where(mask, nxt, big)
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    return [labels == v for v in np.unique(labels[mask])]


def read_scene(image) -> dict:
    """Objects found in ``image`` (uint8 (3,S,S) or float in [0,1]), sorted left to right.

    Each object: colour, shape, size ("small"/"large"), centre (x, y) and box (x0, y0, w, h) in pixels.
    """
    x = _as_float_hwc(image)
    s = x.shape[0]
    dist = ((x[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    cls = dist.argmin(-1)
    min_area = max(6, round(16 * (s / 32) ** 2))  # drops specks; a small triangle has ~40 pixels
    size_cut = (SIZES["small"] + SIZES["large"]) / 2 * s / 32
    objects = []
    for ci, name in enumerate(_COLOUR_NAMES, start=1):
        for comp in _components(cls == ci):
            area = int(comp.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(comp)
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            bw, bh = x1 - x0, y1 - y0
            box = comp[y0:y1, x0:x1]
            top, bottom = box[: bh // 2].sum(), box[bh - bh // 2:].sum()
            c = max(1, round(min(bw, bh) / 5))
            corners = np.concatenate([box[:c, :c].ravel(), box[:c, -c:].ravel(),
                                      box[-c:, :c].ravel(), box[-c:, -c:].ravel()])
            if top < 0.6 * bottom:
                shape = "triangle"
            elif corners.mean() >= 0.5:
                shape = "square"
            else:
                shape = "circle"
            objects.append({"colour": name, "shape": shape, "size": "large" if max(bw, bh) > size_cut else "small",
                            "centre": (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                            "box": (int(x0), int(y0), int(bw), int(bh)), "area": area})
    objects.sort(key=lambda o: o["centre"])
    return {"objects": objects}


def _relation(a: dict, b: dict) -> str:
    dx, dy = b["centre"][0] - a["centre"][0], b["centre"][1] - a["centre"][1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _same(found: dict, want: dict) -> bool:
    return (found["colour"] == want["colour"] and found["shape"] == want["shape"]
            and (not want.get("size_said", True) or want.get("size") is None or found["size"] == want["size"]))


def matches(image, scene: dict) -> bool:
    """True when ``image`` shows exactly the objects of ``scene`` (colour, shape, the size when the caption
    says it) and, for two objects, their relation. Extra or missing objects make it False."""
    want = scene["objects"]
    found = read_scene(image)["objects"]
    if len(found) != len(want):
        return False
    for perm in itertools.permutations(found):
        if all(_same(f, w) for f, w in zip(perm, want)):
            if scene.get("relation") is None or _relation(perm[0], perm[1]) == scene["relation"]:
                return True
    return False


def accuracy(images, scenes) -> float:
    """Fraction of ``images`` (a batch tensor or a list) that ``matches`` their ``scenes``."""
    images, scenes = list(images), list(scenes)
    if len(images) != len(scenes):
        raise ValueError(f"images and scenes must have the same length, got {len(images)} and {len(scenes)}")
    if not images:
        raise ValueError("accuracy of an empty batch is undefined")
    return sum(matches(im, sc) for im, sc in zip(images, scenes)) / len(images)
