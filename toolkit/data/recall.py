"""Synthetic long-context retrieval: key-value recall and needle retrieval in real text.

A cache compressor that loses information shows it first where a model must
fetch one exact fact from far back. This module builds such tasks out of
corpus tokens, so the filler is natural text and the facts are the only thing
the model cannot predict:

* **facts** are lines ``"\\nThe code of tavoke is 4821.\\n"``: a made-up key
  word and a random 4-digit value, spliced into the filler at random token
  positions across the whole context;
* **queries** repeat the fact's prefix ``"\\nThe code of tavoke is"``; the
  answer is the value's tokens. A fact's tokens are exactly its query's
  tokens followed by its answer's, so copying is possible token for token.

``needle`` is one fact at a chosen depth; ``kv`` is many facts, several of
them queried. Training rows put every query after the context; evaluation
splits a row into ``context`` (what a cache holds) and ``query`` (fed through
the cache), so the answer depends on the cache and not on a full-precision
prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RecallTask", "make_task", "make_training_row", "random_key"]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def random_key(rng: np.random.Generator, syllables: int = 3) -> str:
    """A pronounceable made-up word (``tavoke``): in no dictionary, so only the context knows it."""
    return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   for _ in range(syllables))


def _fact_parts(tok, key: str, value: str) -> tuple[list[int], list[int], list[int]]:
    query = tok.encode(f"\nThe code of {key} is".encode())
    answer = tok.encode(f" {value}.".encode())
    tail = tok.encode(b"\n")
    return query, answer, tail


@dataclass(frozen=True)
class RecallTask:
    """One evaluation item: the cache holds ``context``; ``query`` then ``answer`` follow it."""

    context: list[int]
    query: list[int]
    answer: list[int]
    depth: float  # where the queried fact sits, as a fraction of the context


def _splice(filler: np.ndarray, facts: list[list[int]], positions: list[int]) -> list[int]:
    out: list[int] = []
    prev = 0
    for pos, fact in sorted(zip(positions, facts, strict=True), key=lambda t: t[0]):
        out.extend(filler[prev:pos].tolist())
        out.extend(fact)
        prev = pos
    out.extend(filler[prev:].tolist())
    return out


def _draw_facts(tok, rng: np.random.Generator, n: int):
    keys: set[str] = set()
    while len(keys) < n:
        keys.add(random_key(rng))
    facts = []
    for key in sorted(keys, key=lambda _: rng.random()):
        value = f"{rng.integers(10000):04d}"
        facts.append(_fact_parts(tok, key, value))
    return facts


def make_task(tok, filler_ids: np.ndarray, rng: np.random.Generator, context_len: int,
              n_facts: int = 1, depth: float | None = None) -> RecallTask:
    """A task whose context is exactly ``context_len`` tokens.

    With ``n_facts=1`` it is needle retrieval (``depth`` places the fact;
    random when None). With more, the facts spread evenly at random and one
    of them, at ``depth`` if given, is queried.
    """
    if n_facts < 1:
        raise ValueError(f"n_facts must be at least 1, got {n_facts}")
    facts = _draw_facts(tok, rng, n_facts)
    fact_tokens = [q + a + t for q, a, t in facts]
    need = sum(len(f) for f in fact_tokens)
    n_fill = context_len - need
    if n_fill < 16:
        raise ValueError(f"context_len {context_len} leaves no room for {n_facts} facts")
    if len(filler_ids) < n_fill + 1:
        raise ValueError(f"filler has {len(filler_ids)} tokens, need {n_fill + 1}")
    start = int(rng.integers(0, len(filler_ids) - n_fill))
    filler = filler_ids[start:start + n_fill]
    positions = sorted(int(p) for p in rng.integers(0, n_fill, n_facts))
    target = int(rng.integers(n_facts))
    if depth is not None:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        target = 0
        positions[0] = min(n_fill, int(round(depth * n_fill)))
    order = sorted(range(n_facts), key=lambda i: positions[i])
    context = _splice(filler, [fact_tokens[i] for i in order], [positions[i] for i in order])
    # Depth as the fact's token offset over the context length.
    before = positions[target] + sum(len(fact_tokens[i]) for i in order if positions[i] < positions[target]
                                     or (positions[i] == positions[target] and i < target))
    query, answer, _ = facts[target]
    return RecallTask(context=context, query=query, answer=answer, depth=before / context_len)


def make_training_row(tok, filler_ids: np.ndarray, rng: np.random.Generator, seq_len: int,
                      max_facts: int = 16, max_queries: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """One training sequence of ``seq_len + 1`` tokens and a per-target weight class.

    Returns ``(ids, kind)`` where ``kind[i]`` describes target ``ids[i+1]``:
    0 ordinary text, 1 an answer token (the part worth up-weighting), -1 a
    fact's value inside the context (random digits nobody can predict, so not
    trained on).
    """
    n_facts = int(rng.integers(1, max_facts + 1))
    n_q = int(rng.integers(1, min(n_facts, max_queries) + 1))
    facts = _draw_facts(tok, rng, n_facts)
    asked = rng.choice(n_facts, n_q, replace=False)
    tail: list[int] = []
    tail_kind: list[int] = []
    for i in asked:
        q, a, t = facts[i]
        tail += q + a + t
        tail_kind += [0] * len(q) + [1] * len(a) + [0] * len(t)
    fact_len = sum(len(q) + len(a) + len(t) for q, a, t in facts)
    n_fill = seq_len + 1 - fact_len - len(tail)
    if n_fill < 16:
        raise ValueError(f"seq_len {seq_len} too short for {n_facts} facts and {n_q} queries")
    start = int(rng.integers(0, len(filler_ids) - n_fill))
    filler = filler_ids[start:start + n_fill]
    positions = sorted(int(p) for p in rng.integers(0, n_fill, n_facts))
    ids: list[int] = []
    kind: list[int] = []
    prev = 0
    for pos, (q, a, t) in zip(positions, facts, strict=True):
        ids += filler[prev:pos].tolist() + q + a + t
        kind += [0] * (pos - prev) + [0] * len(q) + [-1] * len(a) + [0] * len(t)
        prev = pos
    ids += filler[prev:].tolist() + tail
    kind += [0] * (n_fill - prev) + tail_kind
    ids_arr = np.asarray(ids, dtype=np.int64)
    # kind is per token; shift by one so it describes each target.
    kind_arr = np.asarray(kind[1:], dtype=np.int8)
    return ids_arr, kind_arr
