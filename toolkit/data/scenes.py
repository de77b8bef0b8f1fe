"""Drawn scenes and questions about them: a visual question answering task that needs the image.

A token-dropping method is only measurable on a model whose answers depend
on the image, and on a task where most image tokens are redundant while a few
are decisive. Scenes here are a textured background with 1-6 small objects
(three shapes, five colours), drawn with numpy so every scene is a pure
function of its seed. Questions come in six kinds:

* ``count_colour`` "How many red objects are there?" (0-6)
* ``count_shape`` "How many circles are there?" (0-6)
* ``colour_of`` "What colour is the square?" (the shape is unique in the scene)
* ``shape_of`` "What shape is the blue object?" (the colour is unique)
* ``left_of`` "What colour is the object left of the red circle?" (the nearest
  object to its left by horizontal distance, posed only when that nearest one
  is clearly nearer than the next)
* ``is_left`` "Is the red circle left of the blue square?" (yes/no, posed only
  when their centres are well apart)

Objects cover about 10% of the image, so at 16 x 16 patches most tokens are
background. Training and held-out scenes come from disjoint seed streams
(``split="train"`` and ``split="test"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["COLOURS", "SHAPES", "KINDS", "Obj", "Scene", "VQAItem", "shape_mask", "make_scene", "make_question",
           "make_item", "items", "answer_vocabulary", "text_only_accuracy"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 40), "green": (40, 175, 65), "blue": (45, 85, 225),
    "yellow": (235, 205, 35), "purple": (155, 65, 195),
}
SHAPES = ("circle", "square", "triangle")
KINDS = ("count_colour", "count_shape", "colour_of", "shape_of", "left_of", "is_left")
_SPLITS = {"train": 0, "test": 1}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: float  # centre, pixels
    y: float
    r: float  # half-size, pixels


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[Obj] = field(default_factory=list)


@dataclass(frozen=True)
class VQAItem:
    image: np.ndarray
    question: str
    answer: str
    kind: str
    objects: tuple[Obj, ...]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # A smooth two-tone gradient plus fine noise: background patches are alike
    # but never identical, as in a photograph.
    base = rng.uniform(25, 70, size=3)
    tilt = rng.uniform(-20, 20, size=(2, 3))
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    img = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1]
    img = img + rng.normal(0, 4, size=img.shape)
    return img


def shape_mask(shape: str, x: float, y: float, r: float, size: int) -> np.ndarray:
    """(size, size) bool: the pixels of a ``shape`` centred at (x, y) of half-size ``r``, as scenes draw it."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - x, yy - y
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    # upright triangle inside the same box
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.62)


def make_scene(rng: np.random.Generator, size: int = 64, max_objects: int = 6) -> Scene:
    n = int(rng.integers(1, max_objects + 1))
    objs: list[Obj] = []
    r_lo, r_hi = size * 0.075, size * 0.1
    margin = r_hi + 1
    tries = 0
    while len(objs) < n and tries < 500:
        tries += 1
        r = float(rng.uniform(r_lo, r_hi))
        x, y = (float(v) for v in rng.uniform(margin, size - margin, size=2))
        if all((x - o.x) ** 2 + (y - o.y) ** 2 > (r + o.r + 2.5) ** 2 for o in objs):
            objs.append(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), x, y, r))
    img = _background(rng, size)
    for o in objs:
        colour = np.array(COLOURS[o.colour], dtype=np.float64) + rng.normal(0, 8, size=3)
        img[shape_mask(o.shape, o.x, o.y, o.r, size)] = colour
    img = np.clip(img + rng.normal(0, 2, size=img.shape), 0, 255).astype(np.uint8)
    return Scene(img, objs)


def _name(o: Obj) -> str:
    return f"{o.colour} {o.shape}"


def _unique(objs: list[Obj], key) -> list[Obj]:
    """The objects whose ``key`` no other object shares."""
    return [o for o in objs if sum(key(p) == key(o) for p in objs) == 1]


def make_question(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> tuple[str, str, str] | None:
    """One (question, answer, kind) about ``scene``, or None when ``kind`` cannot be posed on it."""
    kind = kind or str(rng.choice(KINDS))
    objs = scene.objects
    if kind == "count_colour":
        c = str(rng.choice(list(COLOURS)))
        return f"How many {c} objects are there?", str(sum(o.colour == c for o in objs)), kind
    if kind == "count_shape":
        s = str(rng.choice(SHAPES))
        return f"How many {_PLURAL[s]} are there?", str(sum(o.shape == s for o in objs)), kind
    if kind == "colour_of":
        unique = _unique(objs, lambda o: o.shape)
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"What colour is the {o.shape}?", o.colour, kind
    if kind == "shape_of":
        unique = _unique(objs, lambda o: o.colour)
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"What shape is the {o.colour} object?", o.shape, kind
    named = _unique(objs, _name)
    if kind == "left_of":
        rng.shuffle(named)
        for ref in named:
            left = sorted(((ref.x - o.x, o) for o in objs if o is not ref and o.x < ref.x - 2), key=lambda t: t[0])
            if left and (len(left) == 1 or left[1][0] - left[0][0] > 4):
                return f"What colour is the object left of the {_name(ref)}?", left[0][1].colour, kind
        return None
    if kind == "is_left":
        if len(named) < 2:
            return None
        i, j = rng.choice(len(named), size=2, replace=False)
        a, b = named[int(i)], named[int(j)]
        if abs(a.x - b.x) < 6:
            return None
        return f"Is the {_name(a)} left of the {_name(b)}?", "yes" if a.x < b.x else "no", kind
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


def make_item(seed: int, split: str = "train", size: int = 64, kind: str | None = None) -> VQAItem:
    """Item ``seed`` of ``split``: a pure function of its arguments."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLITS[split], size])
    while True:  # retry scenes on which the drawn kind cannot be posed
        scene = make_scene(rng, size)
        k = kind or str(rng.choice(KINDS))
        q = make_question(scene, rng, k)
        if q is not None:
            return VQAItem(scene.image, q[0], q[1], q[2], tuple(scene.objects))


def items(n: int, split: str = "train", size: int = 64, start: int = 0) -> list[VQAItem]:
    return [make_item(start + i, split, size) for i in range(n)]


def answer_vocabulary() -> list[str]:
    return [str(i) for i in range(7)] + list(COLOURS) + list(SHAPES) + ["yes", "no"]


def text_only_accuracy(train: list[VQAItem], test: list[VQAItem]) -> float:
    """Accuracy of the best image-blind answerer: the commonest training answer to each exact question.

    A language model that never sees the image can do no better than this
    (up to the sampling of ``train``); a question unseen in ``train`` falls
    back to the commonest answer of its kind.
    """
    from collections import Counter
    by_q: dict[str, Counter] = {}
    by_kind: dict[str, Counter] = {}
    for it in train:
        by_q.setdefault(it.question, Counter())[it.answer] += 1
        by_kind.setdefault(it.kind, Counter())[it.answer] += 1
    hits = 0
    for it in test:
        table = by_q.get(it.question) or by_kind.get(it.kind)
        hits += int(table is not None and table.most_common(1)[0][0] == it.answer)
    return hits / max(1, len(test))
