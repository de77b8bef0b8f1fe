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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from toolkit import entropy
from toolkit.text.adapt import HeadAdapter
from toolkit.text.mixer import NgramMixer

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
        self.adapter: HeadAdapter | None = None

    def run(self, streams: list[Stream], costs: dict[int, list[float]] | None = None,
            on_tokens: Callable[[int], None] | None = None) -> dict[int, list[int]]:
        """Code the batch; returns the tokens of every stream that has a decoder, by index.

        ``costs[i]`` collects stream ``i``'s bits per token; ``on_tokens(n)`` hears of coded tokens.
        """
        if not streams:
            return {}
        s = self.s
        lengths = [st.length for st in streams]
        out: dict[int, list[int]] = {i: [] for i, st in enumerate(streams) if st.coder is not None
                                     and st.coder.decoding}
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(s.threads)
        try:
            with torch.inference_mode():
                engine = self.model.engine(s.engine, s.window, s.keep, s.dtype)
                engine.reset(len(streams))
                if s.adapt and self.adapter is None:
                    self.adapter = HeadAdapter(engine.top(), s.adapt, s.adapt_tokens, s.adapt_rows, engine.dtype)
                adapter = self.adapter if s.adapt else None
                cur = torch.full((len(streams),), self.bos, dtype=torch.long)
                history: list[list[int]] = [[] for _ in streams]
                # finished streams leave the batch once a quarter of it is done (engines that can drop
                # rows): the steps that remain cost what the live streams need. Both sides know every
                # length, so they drop the same rows at the same step.
                compact = hasattr(engine, "select")
                rows = list(range(len(streams)))  # engine row -> index into streams
                pending = 0
                for t in range(max(lengths)):
                    if compact:
                        live = [j for j, r in enumerate(rows) if t < lengths[r]]
                        if len(live) * 4 <= len(rows) * 3:
                            engine.select(torch.tensor(live, dtype=torch.long))
                            cur = cur[live]
                            history = [history[j] for j in live]
                            rows = [rows[j] for j in live]
                    # the adapter's logits() replaces the engine's top (the adapted head)
                    logits = (engine.step(cur, adapter) if adapter is not None else engine.step(cur))[:, :self.alphabet]
                    active = [t < lengths[r] for r in rows]
                    model_probs = torch.softmax(logits, dim=-1) if self.mixer or adapter is not None else None
                    if self.mixer is not None:
                        table = entropy.probs_to_table(self.mixer.mix(model_probs, history, active))
                    else:
                        table = entropy.freqs_to_table(entropy.logits_to_freqs(logits), entropy.DEFAULT_TOTAL_BITS)
                    nxt = cur.clone()
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
                    if adapter is not None:
                        adapter.observe(model_probs, coded, active)
                    if self.mixer is not None:
                        self.mixer.update(history, coded, active)
                    cur = nxt
                    if on_tokens is not None:
                        pending += sum(active)
                        if t % _REPORT_EVERY == _REPORT_EVERY - 1:
                            on_tokens(pending)
                            pending = 0
                if on_tokens is not None and pending:
                    on_tokens(pending)
                if adapter is not None:
                    adapter.flush()
        finally:
            torch.set_num_threads(prev_threads)
        return out
