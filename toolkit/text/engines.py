"""The forwards that give the lockstep coder its logits.

* :class:`LeanLlama` (Llama-family models): the model's own weights in a
  short forward written for lockstep decoding, with a preallocated KV cache
  that restarts from the last ``keep`` tokens when it fills (``keep=0``: a
  ring buffer, a sliding window that never recomputes). It reads a config
  and a state dict, so the shipped model runs without ``transformers``.
* :class:`HFEngine` (any ``transformers`` causal LM): the model's forward
  with its own cache; when the cache is full it restarts from the last
  ``keep`` tokens (``window // 2`` when ``keep=0``).

Both take one token per stream per step and return the next-token logits of
every stream, so encoder and decoder run the same shapes in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from toolkit.text.llama import rope_theta, supports

__all__ = ["LeanLlama", "HFEngine", "Top", "rms_norm", "native_bf16"]


def native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (AMX or AVX512-BF16), where the lean engine runs 1.6x faster in bf16."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(p() for p in probes if p is not None)


class LeanLlama:
    """Lockstep forward of a Llama-family model over its own weights, with a KV cache.

    ``keep > 0``: when ``window`` tokens are cached, the cache restarts from
    the last ``keep`` tokens, re-read in one causal pass at positions
    ``0..keep-1`` (the same computation as the ``hf`` engine). ``keep == 0``:
    a ring buffer; every step attends to the last ``window`` cached keys and
    nothing is re-read (a sliding-window attention, as in Mistral, whose
    receptive field grows through the layers).
    """

    def __init__(self, cfg: Any, weights: Mapping[str, torch.Tensor], window: int, keep: int,
                 dtype: torch.dtype):
        """``cfg``: the model's config (attributes as in ``config.json``); ``weights``: its state dict."""
        self.h = cfg.num_attention_heads
        self.kv = getattr(cfg, "num_key_value_heads", None) or self.h
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.h
        self.eps = cfg.rms_norm_eps
        self.window, self.keep = window, keep
        self.dtype = dtype
        theta = rope_theta(cfg)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.d, 2, dtype=torch.float64) / self.d))
        self.cos, self.sin = self._rope(torch.arange(window, dtype=torch.float64))

        def w(name: str) -> torch.Tensor:
            return weights[name].detach().to(dtype).contiguous()

        def cat(*names: str) -> torch.Tensor:
            return torch.cat([weights[n].detach() for n in names]).to(dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append((
                w(p + "input_layernorm.weight"),
                cat(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                w(p + "self_attn.o_proj.weight"),
                w(p + "post_attention_layernorm.weight"),
                cat(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                w(p + "mlp.down_proj.weight"),
            ))
        self.norm = w("model.norm.weight")
        tied = "lm_head.weight" not in weights and getattr(cfg, "tie_word_embeddings", False)
        self.head = w("model.embed_tokens.weight" if tied else "lm_head.weight")
        self.inter = self.layers[0][4].shape[0] // 2 if self.layers else 0

    @classmethod
    def from_model(cls, model: Any, window: int, keep: int, dtype: torch.dtype) -> LeanLlama:
        """From a loaded ``transformers`` Llama (its config and state dict)."""
        return cls(model.config, model.state_dict(), window, keep, dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos and sin ``[L, d]`` at ``positions`` (float64 angles, then the engine's dtype)."""
        ang = positions[:, None] * self.inv_freq
        return (torch.cat([ang.cos(), ang.cos()], dim=-1).to(self.dtype),
                torch.cat([ang.sin(), ang.sin()], dim=-1).to(self.dtype))

    supports = staticmethod(supports)

    def reset(self, streams: int) -> None:
        shape = (streams, self.kv, self.window, self.d)
        self.k = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.pos = 0
        self.history: list[torch.Tensor] = []

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these streams (rows of the batch), in this order: finished streams leave the batch."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.history = [h[rows] for h in self.history]

    def step(self, tokens: torch.Tensor, top: Any = None) -> torch.Tensor:
        """Logits of the next token of every stream.

        ``top`` (the :class:`~toolkit.text.adapt.HeadAdapter`: anything with ``logits(r)``) replaces
        the last MLP, norm and head; ``r`` is the residual stream that enters
        the last MLP at the predicting position.
        """
        if self.keep == 0:
            return self._forward(tokens[:, None], ring=True, top=top)
        self.history.append(tokens)
        if self.pos >= self.window:
            self.history = self.history[-self.keep :]
            self.pos = 0
            return self._forward(torch.stack(self.history, dim=1), ring=False, top=top)
        return self._forward(tokens[:, None], ring=False, top=top)

    def top(self) -> Top:
        """The weights after the last attention block: last MLP, final norm, output head."""
        ln1, wqkv, wo, ln2, wgu, wd = self.layers[-1]
        return Top(ln2, wgu, wd, self.norm, self.head, self.eps, self.inter)

    def _forward(self, tokens: torch.Tensor, ring: bool, top: Any = None) -> torch.Tensor:
        s, n_new = tokens.shape
        h, kv, d = self.h, self.kv, self.d
        pos0 = self.pos
        if pos0 + n_new <= self.window:  # always, but for the ring buffer's ever-growing positions
            cos, sin = self.cos[pos0 : pos0 + n_new], self.sin[pos0 : pos0 + n_new]
        else:
            cos, sin = self._rope(torch.arange(pos0, pos0 + n_new, dtype=torch.float64))
        if ring:
            slots = slice(pos0 % self.window, pos0 % self.window + 1)
            n_keys = min(pos0 + 1, self.window)
        else:
            slots = slice(pos0, pos0 + n_new)
            n_keys = pos0 + n_new
            # several new tokens only ever arrive after a restart (pos0 == 0), so queries and keys
            # line up and a plain causal mask is the right one
            if n_new > 1 and pos0 != 0:
                raise RuntimeError("multi-token step must start at position 0")
        causal = n_new > 1
        x = self.embed[tokens]  # [S, L, H]
        for i, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(self.layers):
            qkv = rms_norm(x, ln1, self.eps) @ wqkv.T
            q = qkv[..., : h * d].view(s, n_new, h, d).transpose(1, 2)
            k = qkv[..., h * d : (h + kv) * d].view(s, n_new, kv, d).transpose(1, 2)
            v = qkv[..., (h + kv) * d :].view(s, n_new, kv, d).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.k[i][:, :, slots] = k
            self.v[i][:, :, slots] = v
            keys, vals = self.k[i][:, :, :n_keys], self.v[i][:, :, :n_keys]
            if kv != h:
                keys = keys.repeat_interleave(h // kv, dim=1)
                vals = vals.repeat_interleave(h // kv, dim=1)
            # torch's fused CPU attention: much faster than a bmm of tiny matrices per head
            o = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, is_causal=causal)
            o = o.transpose(1, 2).reshape(s, n_new, h * d)
            x = x + o @ wo.T
            if i == len(self.layers) - 1:
                break
            gu = rms_norm(x, ln2, self.eps) @ wgu.T
            x = x + (torch.nn.functional.silu(gu[..., : self.inter]) * gu[..., self.inter :]) @ wd.T
        self.pos += n_new
        return (top or self.top()).logits(x[:, -1]).float()


@dataclass
class Top:
    """The last MLP block, the final norm and the output head: the part the adapter trains."""

    ln: torch.Tensor
    wgu: torch.Tensor
    wd: torch.Tensor
    norm: torch.Tensor
    head: torch.Tensor
    eps: float
    inter: int

    def hidden(self, r: torch.Tensor) -> torch.Tensor:
        """The output head's input: the last MLP block and the final norm applied to ``r``."""
        gu = rms_norm(r, self.ln, self.eps) @ self.wgu.T
        x = r + (torch.nn.functional.silu(gu[..., : self.inter]) * gu[..., self.inter :]) @ self.wd.T
        return rms_norm(x, self.norm, self.eps)

    def logits(self, r: torch.Tensor) -> torch.Tensor:
        return self.hidden(r) @ self.head.T


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in fp32, scaled in the weight's dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class HFEngine:
    """Any causal LM through its own forward and KV cache; the window slides by re-reading."""

    def __init__(self, model: Any, window: int, keep: int):
        self.model = model
        self.window = window
        self.keep = keep or window // 2  # a ring buffer needs the lean engine

    def reset(self, streams: int) -> None:
        self.cache = None
        self.history: list[torch.Tensor] = []
        self.cached = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.history.append(tokens)
        if self.cached >= self.window:
            ctx = torch.stack(self.history[-self.keep :], dim=1)
            self.history = self.history[-self.keep :]
            out = self.model(input_ids=ctx, use_cache=True)
            self.cached = ctx.shape[1]
        else:
            out = self.model(input_ids=tokens[:, None], past_key_values=self.cache, use_cache=True)
            self.cached += 1
        self.cache = out.past_key_values
        return out.logits[:, -1].float()
