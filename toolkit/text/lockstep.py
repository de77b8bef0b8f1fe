"""The lockstep coder: every stream of a batch coded together, one token per stream per step.

At step ``t`` the engine reads token ``t-1`` of every stream and predicts
token ``t`` of every stream in one forward pass; the prediction is mixed with
the file's n-gram counts (:class:`~toolkit.text.mixer.NgramMixer`), becomes
an integer table (:func:`toolkit.entropy.probs_to_table`), and each stream's
token is coded with its own row; the output head then learns the coded
tokens (:class:`~toolkit.text.adapt.HeadAdapter`). Encoder and decoder run
this one loop: a stream with a :class:`~toolkit.entropy.RangeCoder` codes
(encodes the known token, or decodes one), a stream without one replays its
known tokens, so both sides compute the same numbers with the same shapes in
the same order.

A :class:`Lockstep` holds one file's state (the n-gram table and the
adapted head carry over from batch to batch); a new file needs a new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit import entropy
from toolkit.progress import Progress, reporter
from toolkit.text.mixer import NgramMixer, mass_to_table

__all__ = ["Lockstep", "Stream"]

#: steps between progress reports (a report costs a Python call, a step about a millisecond)
_REPORT_EVERY = 16


@dataclass
class Stream:
    """One stream of a batch: its known tokens (encoding, replay) or its length (decoding), and its coder."""

    length: int
    tokens: list[int] | None = None
    coder: entropy.RangeCoder | None = None


class Lockstep:
    """One file's lockstep coder over ``model`` (a :class:`~toolkit.text.model.CodingModel`).

    ``settings`` carries the resolved lm settings (``engine``, ``dtype``,
    ``window``, ``keep``, ``threads``, ``orders``, ``gamma``, ``contexts``,
    ``adapt``, ``adapt_tokens``, ``adapt_rows``): the lm codec passes the
    config its header records.
    """

    def __init__(self, model: Any, settings: Any):
        self.model, self.s = model, settings
        tok = model.tokenizer
        self.alphabet, self.bos = tok.alphabet, tok.bos
        self.mixer = NgramMixer(settings.orders, settings.gamma, settings.contexts, tok.alphabet) \
            if settings.orders else None
        self.head: Any = None  # the adapted head, carried from batch to batch

    def run(self, streams: list[Stream], costs: dict[int, list[float]] | None = None,
            progress: Progress = False) -> dict[int, list[int]]:
        """Code the batch; returns the tokens of every stream that has a decoder, by index.

        ``costs[i]`` collects stream ``i``'s bits per token; ``progress`` counts the batch's coded tokens.
        """
        if not streams:
            return {}
        lengths = [st.length for st in streams]
        total = sum(lengths)
        report = reporter(progress, total, "coding")
        out: dict[int, list[int]] = {i: [] for i, st in enumerate(streams) if st.coder is not None
                                     and st.coder.decoding}
        with self._predictor(len(streams)) as pred:
            cur = np.full(len(streams), self.bos, dtype=np.int64)
            history: list[list[int]] = [[] for _ in streams]
            # finished streams leave the batch once a quarter of it is done (engines that can drop
            # rows): the steps that remain cost what the live streams need. Both sides know every
            # length, so they drop the same rows at the same step.
            rows = list(range(len(streams)))  # engine row -> index into streams
            done = 0
            for t in range(max(lengths)):
                if pred.compact:
                    live = [j for j, r in enumerate(rows) if t < lengths[r]]
                    if len(live) * 4 <= len(rows) * 3:
                        pred.select(np.array(live, dtype=np.int64))
                        cur = cur[live]
                        history = [history[j] for j in live]
                        rows = [rows[j] for j in live]
                active = [t < lengths[r] for r in rows]
                table = pred.table(cur, history, active)
                nxt = cur.copy()
                for j, r in enumerate(rows):
                    if not active[j]:
                        continue
                    st = streams[r]
                    known = st.tokens[t] if st.tokens is not None else None
                    sym = known if st.coder is None else st.coder.code(table[j : j + 1], known)
                    if r in out:
                        out[r].append(sym)
                    nxt[j] = sym
                    if costs is not None:
                        costs.setdefault(r, []).append(-math.log2(float(table[j, sym])))
                coded = nxt.tolist()
                pred.learn(coded, active)
                if self.mixer is not None:
                    self.mixer.update(history, coded, active)
                cur = nxt
                done += sum(active)
                if t % _REPORT_EVERY == _REPORT_EVERY - 1:
                    report(done, total)
            report(done, total)
        return out

    def _predictor(self, streams: int) -> Any:
        if self.s.engine == "int":
            engine = self.model.engine("int", self.s.window, self.s.keep, "int8", self.s.device)
            if self.head is None:
                self.head = engine.new_head(self.s.adapt, self.s.adapt_tokens, self.s.adapt_rows)
            return _IntPredictor(self, engine, streams)
        return _FloatPredictor(self, streams)


class _IntPredictor:
    """The integer engine's step: integer logits, probabilities, mixing and table; the head learns."""

    compact = True

    def __init__(self, ls: Lockstep, engine: Any, streams: int):
        self.ls, self.engine = ls, engine
        self.engine.reset(streams)
        self.parts = max(1, ls.s.threads)

    def __enter__(self) -> _IntPredictor:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        # BLAS on one thread: the engine's own threads split the rows (results do not depend on either)
        self._blas = threadpool_limits(1, user_api="blas")
        self.pool = ThreadPoolExecutor(self.parts) if self.parts > 1 else None
        self.ls.head.pool = self.pool
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.ls.head.flush()
        finally:
            if self.pool is not None:
                self.pool.shutdown()
            self.ls.head.pool = None
            self._blas.restore_original_limits()

    def select(self, rows: np.ndarray) -> None:
        self.engine.select(rows)

    def table(self, cur: np.ndarray, history: list[list[int]], active: list[bool]) -> np.ndarray:
        from toolkit.text.integer import normalize_q30

        ls = self.ls
        probs = self.engine.step(cur, ls.head, ls.alphabet, self.pool, self.parts)
        self.probs = normalize_q30(probs) if ls.s.adapt else None
        freqs = ls.mixer.mix_int(probs, history, active) if ls.mixer is not None else mass_to_table(probs)
        return freqs * (1.0 / (1 << entropy.DEFAULT_TOTAL_BITS))  # exact: integers over a power of 2

    def learn(self, coded: list[int], active: list[bool]) -> None:
        if self.probs is not None:
            self.ls.head.observe(self.probs, coded, active)


class _FloatPredictor:
    """A float engine's step (lean or ``transformers``), on torch with the settings' thread count."""

    def __init__(self, ls: Lockstep, streams: int):
        import torch

        self.ls, self.torch, self.streams = ls, torch, streams

    def __enter__(self) -> _FloatPredictor:
        from toolkit.text.adapt import HeadAdapter

        torch, ls, s = self.torch, self.ls, self.ls.s
        self._threads = torch.get_num_threads()
        torch.set_num_threads(s.threads)
        self._mode = torch.inference_mode()
        self._mode.__enter__()
        self.engine = ls.model.engine(s.engine, s.window, s.keep, s.dtype)
        self.engine.reset(self.streams)
        if s.adapt and ls.head is None:
            ls.head = HeadAdapter(self.engine.top(), s.adapt, s.adapt_tokens, s.adapt_rows, self.engine.dtype)
        self.adapter = ls.head if s.adapt else None
        self.compact = hasattr(self.engine, "select")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.adapter is not None and exc[0] is None:
                self.adapter.flush()
        finally:
            self._mode.__exit__(*exc)
            self.torch.set_num_threads(self._threads)

    def select(self, rows: np.ndarray) -> None:
        self.engine.select(self.torch.from_numpy(rows))

    def table(self, cur: np.ndarray, history: list[list[int]], active: list[bool]) -> np.ndarray:
        torch, ls = self.torch, self.ls
        tokens = torch.from_numpy(cur)
        # the adapter's logits() replaces the engine's top (the adapted head)
        logits = (self.engine.step(tokens, self.adapter) if self.adapter is not None
                  else self.engine.step(tokens))[:, : ls.alphabet]
        self.probs = torch.softmax(logits, dim=-1) if ls.mixer or self.adapter is not None else None
        if ls.mixer is not None:
            return entropy.probs_to_table(ls.mixer.mix(self.probs, history, active))
        return entropy.freqs_to_table(entropy.logits_to_freqs(logits), entropy.DEFAULT_TOTAL_BITS)

    def learn(self, coded: list[int], active: list[bool]) -> None:
        if self.adapter is not None:
            self.adapter.observe(self.probs, coded, active)
