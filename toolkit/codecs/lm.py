"""LM codec: lossless coding of text and bytes with a causal language model.

Each text chunk (a segment of ``segment`` bytes) first passes through the
exact text transforms of :mod:`toolkit.codecs.textform` (hard-wrapped lines
joined, line numbers that count on dropped; their side data leads the
payload), then becomes one or more token streams (pieces, see
:func:`plan_pieces`). All streams of a batch are coded in lockstep: at step
``t`` the model reads token ``t-1`` of every stream and predicts token ``t``
of every stream in one forward pass over a bounded window of ``window``
tokens; the prediction is mixed with the file's own n-gram counts
(:class:`_NgramMixer`), becomes an integer table
(:func:`toolkit.entropy.probs_to_table`) and each stream's token is
range-coded with its own row; the output head learns the file as it goes
(:class:`_Adapter`). The decoder runs the very same loop, feeding the tokens
it has just decoded, so both sides compute the same numbers with the same
shapes in the same order.

Chunks the model cannot help (binary data, text the tokenizer cannot
reproduce, or where zstd wins) are declined and the container stores them
with zstd or raw. The decoder recognises such chunks from their bytes and
replays them as known streams, so the batch it runs is the encoder's batch.

Two engines compute the logits:

* ``lean`` (Llama-family models): the model's own weights in a short
  forward written for lockstep decoding, with a preallocated KV cache that
  restarts from the last ``keep`` tokens when it fills (``keep=0``: a ring
  buffer, a sliding window that never recomputes).
* ``hf`` (any ``transformers`` causal LM): the model's forward with its own
  cache; when the cache is full it restarts from the last ``keep`` tokens
  (``window // 2`` when ``keep=0``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import constriction
import numpy as np
import torch
import zstandard

from toolkit import entropy
from toolkit.codecs import textform
from toolkit.codecs.registry import Codec, register_codec
from toolkit.entropy.varint import read_varint
from toolkit.entropy.varint import varint as _varint
from toolkit.errors import ConfigError, FormatError, ModelMismatchError

logger = logging.getLogger(__name__)

__all__ = ["LMCodec", "LMConfig", "load_coding_model", "CodingModel"]

DEFAULT_MODEL = "default"
_VERSION = 5


@dataclass
class LMConfig:
    model: str = DEFAULT_MODEL
    window: int = 256
    keep: int = 64
    segment: int = 65536
    streams: int = 128
    batch: int = 0
    piece: int = 1024
    threads: int = 0
    engine: str = "auto"
    dtype: str = "auto"
    orders: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3, 4, 6])
    gamma: float = 8.0
    contexts: int = 1 << 19
    adapt: float = 0.03
    adapt_tokens: int = 128
    adapt_rows: int = 1
    unwrap: bool = True
    numbers: bool = True

    def __post_init__(self):
        if not 16 <= self.window <= 1 << 16:
            raise ConfigError(f"window must be in 16..65536 tokens, got {self.window}")
        if not 0 <= self.keep < self.window:
            raise ConfigError(f"keep must be in 0..window-1 tokens, got {self.keep}")
        if not 256 <= self.segment <= 1 << 24:
            raise ConfigError(f"segment must be in 256..16777216 bytes, got {self.segment}")
        if not 1 <= self.streams <= 1024:
            raise ConfigError(f"streams must be in 1..1024, got {self.streams}")
        if not 0 <= self.piece <= 1 << 24:
            raise ConfigError(f"piece must be in 0..16777216 tokens (0: one stream per segment), got {self.piece}")
        if self.batch == 0:
            # room to split: a batch of half as many segments as streams lets each long segment take two
            self.batch = max(1, self.streams // 2) if self.piece else self.streams
        if not 1 <= self.batch <= self.streams:
            raise ConfigError(f"batch must be in 1..streams ({self.streams}) segments, got {self.batch}")
        if not 0 <= self.threads <= 256:
            raise ConfigError(f"threads must be in 0..256, got {self.threads}")
        if self.engine not in ("auto", "lean", "hf"):
            raise ConfigError(f"engine must be auto, lean or hf, got {self.engine!r}")
        if not isinstance(self.orders, list) or not all(isinstance(k, int) and 1 <= k <= 32 for k in self.orders):
            raise ConfigError(f"orders must be a list of context lengths in 1..32, got {self.orders!r}")
        self.orders = sorted(set(self.orders))
        if not 0.01 <= self.gamma <= 1000:
            raise ConfigError(f"gamma must be in 0.01..1000, got {self.gamma}")
        if not 0 <= self.contexts <= 1 << 24:
            raise ConfigError(f"contexts must be in 0..16777216, got {self.contexts}")
        if not 0 <= self.adapt <= 10:
            raise ConfigError(f"adapt must be a learning rate in 0..10 (0 turns adaptation off), got {self.adapt}")
        if not 1 <= self.adapt_tokens <= 1 << 20:
            raise ConfigError(f"adapt_tokens must be in 1..1048576 (tokens per SGD step), got {self.adapt_tokens}")
        if not 1 <= self.adapt_rows <= 64:
            raise ConfigError(f"adapt_rows must be in 1..64 (train on every n-th stream), got {self.adapt_rows}")
        if not isinstance(self.unwrap, bool):
            raise ConfigError(f"unwrap must be true or false, got {self.unwrap!r}")
        if not isinstance(self.numbers, bool):
            raise ConfigError(f"numbers must be true or false, got {self.numbers!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


def _native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (AMX or AVX512-BF16), where the lean engine runs 1.6x faster in bf16."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(p() for p in probes if p is not None)


# --------------------------------------------------------------------------- tokenizers
class _ByteTok:
    """The toolkit's ByteTokenizer: every byte string round-trips."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.alphabet = tok.bos_id  # BOS is the last id and never coded
        self.bos = tok.bos_id
        self.digest = tok.sha256()

    def encode_batch(self, chunks: list[bytes]) -> list[list[int]]:
        return self.tok.encode_batch(chunks)

    def decode(self, ids: list[int]) -> bytes:
        return self.tok.decode(ids)


class _HFTok:
    """A Hugging Face tokenizer; a chunk is coded only if its text round-trips exactly."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.alphabet = len(tok)
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.bos = int(bos) if bos is not None else 0
        self.digest = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest() \
            if getattr(tok, "backend_tokenizer", None) is not None else hashlib.sha256(
                repr(sorted(tok.get_vocab().items())).encode()).hexdigest()

    def encode_batch(self, chunks: list[bytes]) -> list[list[int] | None]:
        out: list[list[int] | None] = []
        for c in chunks:
            try:
                text = c.decode("utf-8")
            except UnicodeDecodeError:
                out.append(None)
                continue
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            back = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(list(ids) if back == text else None)
        return out

    def decode(self, ids: list[int]) -> bytes:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).encode("utf-8")


# --------------------------------------------------------------------------- engines
class _LeanLlama:
    """Lockstep forward of a Llama-family model over its own weights, with a KV cache.

    ``keep > 0``: when ``window`` tokens are cached, the cache restarts from
    the last ``keep`` tokens, re-read in one causal pass at positions
    ``0..keep-1`` (the same computation as the ``hf`` engine). ``keep == 0``:
    a ring buffer; every step attends to the last ``window`` cached keys and
    nothing is re-read (a sliding-window attention, as in Mistral, whose
    receptive field grows through the layers).
    """

    def __init__(self, model: Any, window: int, keep: int, dtype: torch.dtype):
        cfg = model.config
        self.h = cfg.num_attention_heads
        self.kv = getattr(cfg, "num_key_value_heads", None) or self.h
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.h
        self.eps = cfg.rms_norm_eps
        self.window, self.keep = window, keep
        self.dtype = dtype
        theta = _rope_theta(cfg)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.d, 2, dtype=torch.float64) / self.d))
        self.cos, self.sin = self._rope(torch.arange(window, dtype=torch.float64))
        m = model.model

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype).contiguous()

        self.embed = w(m.embed_tokens.weight)
        self.layers = []
        for layer in m.layers:
            a, f = layer.self_attn, layer.mlp
            self.layers.append((
                w(layer.input_layernorm.weight),
                w(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                w(a.o_proj.weight),
                w(layer.post_attention_layernorm.weight),
                w(torch.cat([f.gate_proj.weight, f.up_proj.weight])),
                w(f.down_proj.weight),
            ))
        self.norm = w(m.norm.weight)
        self.head = w(model.lm_head.weight)
        self.inter = self.layers[0][4].shape[0] // 2 if self.layers else 0

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos and sin ``[L, d]`` at ``positions`` (float64 angles, then the engine's dtype)."""
        ang = positions[:, None] * self.inv_freq
        return (torch.cat([ang.cos(), ang.cos()], dim=-1).to(self.dtype),
                torch.cat([ang.sin(), ang.sin()], dim=-1).to(self.dtype))

    @staticmethod
    def supports(model: Any) -> bool:
        cfg = model.config
        return (cfg.model_type in ("llama",) and not getattr(cfg, "attention_bias", False)
                and not getattr(cfg, "mlp_bias", False) and cfg.hidden_act == "silu"
                and _rope_theta(cfg) is not None and not _has_rope_scaling(cfg))

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

        ``top`` (the :class:`_Adapter`: anything with ``logits(r)``) replaces
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

    def top(self) -> _Top:
        """The weights after the last attention block: last MLP, final norm, output head."""
        ln1, wqkv, wo, ln2, wgu, wd = self.layers[-1]
        return _Top(ln2, wgu, wd, self.norm, self.head, self.eps, self.inter)

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
            qkv = _rms(x, ln1, self.eps) @ wqkv.T
            q = qkv[..., : h * d].view(s, n_new, h, d).transpose(1, 2)
            k = qkv[..., h * d : (h + kv) * d].view(s, n_new, kv, d).transpose(1, 2)
            v = qkv[..., (h + kv) * d :].view(s, n_new, kv, d).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
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
            gu = _rms(x, ln2, self.eps) @ wgu.T
            x = x + (torch.nn.functional.silu(gu[..., : self.inter]) * gu[..., self.inter :]) @ wd.T
        self.pos += n_new
        return (top or self.top()).logits(x[:, -1]).float()


@dataclass
class _Top:
    """The last MLP block, the final norm and the output head: the part :class:`_Adapter` trains."""

    ln: torch.Tensor
    wgu: torch.Tensor
    wd: torch.Tensor
    norm: torch.Tensor
    head: torch.Tensor
    eps: float
    inter: int

    def hidden(self, r: torch.Tensor) -> torch.Tensor:
        """The output head's input: the last MLP block and the final norm applied to ``r``."""
        gu = _rms(r, self.ln, self.eps) @ self.wgu.T
        x = r + (torch.nn.functional.silu(gu[..., : self.inter]) * gu[..., self.inter :]) @ self.wd.T
        return _rms(x, self.norm, self.eps)

    def logits(self, r: torch.Tensor) -> torch.Tensor:
        return self.hidden(r) @ self.head.T


class _Adapter:
    """Online adaptation (dynamic evaluation) of the output head to the file being coded.

    A model trained on other text is refitted, as it codes, to the text it
    has just coded: once ``adapt_tokens`` coded tokens are recorded, one SGD
    step (rate ``adapt``) on their cross-entropy, taken by an untied copy of
    the output head. The head's gradient needs no autograd: for logits
    ``h W^T`` the cross-entropy's gradient is ``(p - onehot(y))^T h / n``,
    where ``p`` is the model's softmax, which the coding step computes
    anyway, and ``h`` is the head's input, kept from the coding forward. So
    an update costs one matmul over the recorded tokens.

    The encoder and the decoder code with the same weights, take the same
    steps on the same tokens, and so hold the same weights at every step.
    One adapter lives for one file (one codec instance), like the n-gram
    table. The head is an fp32 master; a bf16 engine codes with a bf16 cast
    of it, made after each update (SGD steps are far below bf16's
    resolution: bf16 masters lost 1.8% on held-out prose).

    Tuning (stage-3 model, 256 KiB of held-out prose and the licences, bits
    per byte): rate 0.03 with a step every 128 tokens from every stream gave
    1.557 and 1.072, against 1.594 and 1.100 for the earlier setting (rate
    0.1, every 256 tokens of every other stream, training the last MLP and
    the final norm as well); 0.045 gave 1.567 and 1.078. Training the last
    MLP and the norm too gained 0.6% and 0.2% at this rate, for a backward
    that cost about a fifth of the coding time. ``adapt_rows`` n > 1 trains
    on every n-th stream only (rotating by step).
    """

    def __init__(self, base: _Top, lr: float, tokens: int, rows: int, dtype: torch.dtype):
        self.base, self.lr, self.dtype = base, lr, dtype
        self.master = base.head.detach().float().clone()
        self.head = self.master.to(dtype)
        self.tokens, self.rows = tokens, rows
        self.seen = self.pending = 0
        self._hidden: torch.Tensor | None = None
        self._grads: list[torch.Tensor] = []
        self._inputs: list[torch.Tensor] = []

    def logits(self, r: torch.Tensor) -> torch.Tensor:
        """The coding step's logits: the model's last MLP and norm, then the adapted head."""
        self._hidden = self.base.hidden(r)
        return self._hidden @ self.head.T

    def observe(self, probs: torch.Tensor, targets: list[int], active: list[bool]) -> None:
        """Record the step's coded tokens (active streams) with the model's ``probs``; train when due."""
        # with ``rows`` n > 1, every n-th active stream, starting one further at each step
        keep = [j for j, a in enumerate(active) if a][self.seen % self.rows :: self.rows]
        self.seen += 1
        if self._hidden is None or not keep:
            return
        idx = torch.tensor(keep, dtype=torch.long)
        g = probs[idx].clone()
        g[torch.arange(len(keep)), torch.tensor([targets[j] for j in keep], dtype=torch.long)] -= 1.0
        self._grads.append(g)
        self._inputs.append(self._hidden[idx])
        self._hidden = None
        self.pending += len(keep)
        if self.pending >= self.tokens:
            self.flush()

    def flush(self) -> None:
        if not self._grads:
            return
        g, h = torch.cat(self._grads), torch.cat(self._inputs)
        n = self.pending
        self._grads, self._inputs, self.pending = [], [], 0
        grad = g.to(h.dtype).T @ h
        if not torch.isfinite(grad.sum()):  # one pass: a NaN or inf anywhere makes the sum one
            return  # keep the weights (both sides see the same numbers)
        # the coder's alphabet may stop short of the head (a BOS row that is never coded)
        self.master[: grad.shape[0]].add_(grad, alpha=-self.lr / n)
        self.head = self.master.to(self.dtype)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in fp32, scaled in the weight's dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rope_theta(cfg: Any) -> float | None:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta) if theta is not None else None


def _has_rope_scaling(cfg: Any) -> bool:
    scaling = getattr(cfg, "rope_scaling", None)
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return kind not in (None, "default")
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict):
        return params.get("rope_type", "default") not in (None, "default")
    return scaling is not None


class _HFEngine:
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


# --------------------------------------------------------------------------- models
@dataclass
class CodingModel:
    """A model, its tokenizer and the identifiers the header records."""

    name: str
    model: Any
    tokenizer: Any
    weights_sha256: str
    _engines: dict = dataclasses.field(default_factory=dict, repr=False)

    def engine_kind(self, config: LMConfig) -> str:
        if config.engine == "auto":
            return "lean" if _LeanLlama.supports(self.model) else "hf"
        return config.engine

    def dtype(self, config: LMConfig) -> str:
        """``dtype=auto``: bf16 for the lean engine on CPUs with bf16 arithmetic, else fp32."""
        if config.dtype != "auto":
            return config.dtype
        return "bfloat16" if self.engine_kind(config) == "lean" and _native_bf16() else "float32"

    def engine(self, config: LMConfig) -> Any:
        kind, name = self.engine_kind(config), self.dtype(config)
        dtype = getattr(torch, name)
        key = (kind, config.window, config.keep, name)
        if key in self._engines:  # built once per model: the lean engine copies and fuses the weights
            return self._engines[key]
        if kind == "lean":
            if not _LeanLlama.supports(self.model):
                raise ConfigError(f"engine=lean needs a Llama-family model, not {self.model.config.model_type}")
            engine: Any = _LeanLlama(self.model, config.window, config.keep, dtype)
        else:
            self.model.to(dtype)
            engine = _HFEngine(self.model, config.window, config.keep)
        self._engines[key] = engine
        return engine

    def header(self) -> dict:
        return {"name": self.name, "weights_sha256": self.weights_sha256,
                "tokenizer_sha256": self.tokenizer.digest, "alphabet": self.tokenizer.alphabet}


@lru_cache(maxsize=4)
def load_coding_model(name: str) -> CodingModel:
    """Load the shipped default, a local directory, or a Hugging Face id (cached per process)."""
    from toolkit.models.lm import DEFAULT_LM_DIR, weights_sha256

    with torch.inference_mode():
        if name == DEFAULT_MODEL:
            if not (DEFAULT_LM_DIR / "model.safetensors").exists():
                raise ModelMismatchError("the shipped LM (toolkit/assets/lm-default) is not installed")
            model, tok = _load_dir(DEFAULT_LM_DIR)
        else:
            model, tok = _load_dir(name)
        model.eval()
        return CodingModel(name, model, tok, weights_sha256(model))


def _load_dir(path: str | Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from toolkit.models.tokenizer import ByteTokenizer

    hf_logging.disable_progress_bar()  # the codec command owns stderr

    p = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        if p.is_dir() and (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
            tok = _ByteTok(ByteTokenizer.load(p))
        else:
            tok = _HFTok(AutoTokenizer.from_pretrained(str(path)))
    except (OSError, ValueError) as e:
        raise ModelMismatchError(f"cannot load model {str(path)!r}: {str(e).splitlines()[0]}") from None
    return model, tok


# --------------------------------------------------------------------------- adaptive mixing
class _NgramMixer:
    """Token n-gram statistics of the file so far, mixed into the model's prediction.

    A small pretrained model knows language in general but not this file;
    counts of what followed each recent context in the file so far supply the
    file's own habits (its vocabulary, its repeated phrases). Starting from the
    model's distribution, each order ``k`` (ascending) interpolates
    ``p <- (1 - l) p + l * counts / n`` with ``l = n / (n + gamma * u)``
    (Witten-Bell weights, softened by ``gamma``), where ``n`` and ``u`` are the
    context's total and distinct continuations. All streams of the file share
    one table, read before and updated after each lockstep step, so encoder
    and decoder see identical counts; the table stops taking new contexts at
    ``contexts`` entries, which bounds memory whatever the file size.
    """

    #: order-1 counts live in a dense [V, V] table when the alphabet is this small: the
    #: previous token alone has hundreds of continuations, too many for per-entry Python work.
    DENSE_LIMIT = 8192

    def __init__(self, orders: list[int], gamma: float, max_contexts: int, alphabet: int = 0):
        self.gamma, self.max_contexts = gamma, max_contexts
        self.dense1 = 1 in orders and 0 < alphabet <= self.DENSE_LIMIT
        self.orders = [k for k in orders if not (k == 1 and self.dense1)]
        self.table: dict[tuple, list] = {}
        self._found: list[list[tuple[tuple, list | None]]] = []
        if self.dense1:
            self.c1 = torch.zeros(alphabet, alphabet, dtype=torch.int32)
            self.n1 = torch.zeros(alphabet, dtype=torch.int64)
            self.u1 = torch.zeros(alphabet, dtype=torch.int64)

    def mix(self, probs: torch.Tensor, history: list[list[int]], active: list[bool]) -> torch.Tensor:
        # The chain p <- (1 - l_k) p + l_k c_k over ascending k unrolls to
        # a * p_model + sum_k w_k c_k with a = prod(1 - l_k) and w_k = l_k prod_{k' > k}(1 - l_k'),
        # so all orders land in one sparse scatter instead of one dense pass each.
        s, v = probs.shape
        scale = [1.0] * s
        # per context: its row, its weight per count and how many continuations it has; the
        # continuations and their counts go into flat lists at C speed (no per-count Python work)
        rows: list[int] = []
        coefs: list[float] = []
        sizes: list[int] = []
        cols: list[int] = []
        cnts: list[int] = []
        table, gamma = self.table, self.gamma
        # the contexts looked up here are the ones update() counts into after coding: keep them
        self._found = found = []
        for j in range(s):
            h = history[j]
            here: list[tuple[tuple, list | None]] = []
            found.append(here)
            if not active[j]:
                continue
            w = 1.0
            for k in reversed(self.orders):  # highest order first: it keeps the most weight
                if len(h) < k:
                    continue
                key = (k, *h[-k:])
                entry = table.get(key)
                here.append((key, entry))
                if entry is None:
                    continue
                n, counts = entry
                lam = n / (n + gamma * len(counts))
                rows.append(j)
                coefs.append(w * lam / n)
                sizes.append(len(counts))
                cols.extend(counts)
                cnts.extend(counts.values())
                w *= 1.0 - lam
            scale[j] = w
        w = torch.tensor(scale, dtype=torch.float32)
        dense = None
        if self.dense1:
            # order 1 is the lowest order: it takes its share of what the higher orders left (w)
            ok = [active[j] and len(history[j]) >= 1 for j in range(s)]
            prev = torch.tensor([history[j][-1] if ok[j] else 0 for j in range(s)], dtype=torch.long)
            n = self.n1[prev].to(torch.float32)
            u = self.u1[prev].to(torch.float32)
            use = torch.tensor(ok) & (n > 0)
            lam = torch.where(use, n / (n + gamma * u).clamp_min(1e-30), torch.zeros_like(n))
            dense = (w * lam / n.clamp_min(1.0))[:, None] * self.c1[prev].to(torch.float32)
            w = w * (1 - lam)
        out = probs * w[:, None]
        if rows:
            reps = np.array(sizes, dtype=np.int64)
            # coef * count in float64, then rounded to float32: what a float32 tensor of the products holds
            vals = (np.repeat(np.array(coefs, dtype=np.float64), reps) *
                    np.array(cnts, dtype=np.float64)).astype(np.float32)
            r = torch.from_numpy(np.repeat(np.array(rows, dtype=np.int64), reps))
            c = torch.from_numpy(np.array(cols, dtype=np.int64))
            out.index_put_((r, c), torch.from_numpy(vals), accumulate=True)
        return out if dense is None else out + dense

    def update(self, history: list[list[int]], tokens: list[int], active: list[bool]) -> None:
        if self.dense1:
            # a few dozen scalar updates: numpy views of the tables beat torch's per-op overhead
            c1, n1, u1 = self.c1.numpy(), self.n1.numpy(), self.u1.numpy()
            for j, tok in enumerate(tokens):
                if active[j] and history[j]:
                    prev = history[j][-1]
                    if c1[prev, tok] == 0:
                        u1[prev] += 1
                    c1[prev, tok] += 1
                    n1[prev] += 1
        table, room = self.table, len(self.table) < self.max_contexts
        found = self._found
        self._found = []
        for j, tok in enumerate(tokens):
            if not active[j]:
                continue
            h = history[j]
            for key, entry in found[j]:
                if entry is None:
                    # another stream may have added this context in this very step
                    entry = table.get(key)
                    if entry is None:
                        if not room:
                            continue
                        entry = table[key] = [0, {}]
                entry[0] += 1
                counts = entry[1]
                counts[tok] = counts.get(tok, 0) + 1
            h.append(tok)
            if len(h) > 64:
                del h[:-32]
        if room and len(table) >= self.max_contexts:
            logger.info("n-gram table full at %d contexts", len(table))


# --------------------------------------------------------------------------- text detection
_TEXT_CONTROL = frozenset(b"\t\n\r\f\v\x1b")
_CONTROL_TABLE = bytes(0 if (b >= 0x20 and b != 0x7F) or b in _TEXT_CONTROL else 1 for b in range(256))


def looks_like_text(chunk: bytes) -> bool:
    """True when at most 1% of the bytes are control codes and the chunk is (nearly) UTF-8."""
    n = len(chunk)
    if n == 0:
        return False
    controls = n - len(chunk.translate(None, delete=bytes(b for b in range(256) if _CONTROL_TABLE[b])))
    if controls * 100 > n:
        return False
    bad = chunk.decode("utf-8", errors="replace").count("\ufffd")
    return bad * 100 <= n


# --------------------------------------------------------------------------- stream plan
def plan_pieces(lengths: list[int], streams: int, piece: int, slack: float = 1.1) -> list[int]:
    """How many streams (pieces) each segment's tokens are cut into, from the token counts alone.

    The lockstep loop runs as many steps as its longest stream, so one
    segment with twice the tokens of the others (text the tokenizer splits
    finely) would leave most streams idle for half the run. Segments longer
    than ``slack`` times the mean are cut into near-equal pieces of at most
    that length, but never shorter than ``piece`` tokens (a piece starts
    with an empty window; 0 turns splitting off), and never into more than
    ``streams`` streams in all (the piece length grows until they fit).
    A batch of fewer than ``streams / 2`` segments is cut further, into
    pieces of ``2 * total / streams`` tokens, so that small files run a
    batch wide enough to be fast. The decoder knows every count before it
    starts (payloads carry theirs; declined segments are re-tokenized), so
    it derives the same plan.
    """
    if not lengths:
        return []
    if piece <= 0 or len(lengths) >= streams:
        return [1] * len(lengths)

    def ks(t: int) -> list[int]:
        return [max(1, -(-n // t)) for n in lengths]

    if 2 * len(lengths) >= streams:
        t = max(piece, math.ceil(slack * sum(lengths) / len(lengths)), 1)
    else:
        # a small batch (a small file, or a file's last batch): cut every segment so that
        # the batch fills half the streams, where pieces of ``piece`` tokens allow
        t = max(piece, math.ceil(2 * sum(lengths) / streams), 1)
    if sum(ks(t)) > streams:
        lo, hi = t, max(lengths)  # ks(max) is one piece each, which fits
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(ks(mid)) <= streams:
                hi = mid
            else:
                lo = mid + 1
        t = lo
    return ks(t)


def _cuts(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` near-equal consecutive ranges covering ``0..n``."""
    edges = [n * p // k for p in range(k + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


# --------------------------------------------------------------------------- the codec
def _read_varint(buf: bytes) -> tuple[int, int]:
    return read_varint(buf, "count in LM payload")


@register_codec("lm")
class LMCodec(Codec):
    """Range coding driven by a causal language model's next-token probabilities."""

    version = _VERSION
    description = "language-model coding of text (shipped model, or --set model=HF_ID_OR_PATH)"
    Config = LMConfig

    def __init__(self, config: LMConfig | None = None, threads: int | None = None):
        super().__init__(config)
        self.chunk_size = self.config.segment
        self.batch_chunks = self.config.batch
        self._cm: CodingModel | None = None
        self._mixer_state: _NgramMixer | None = None
        self._adapter_state: _Adapter | None = None
        self._settings: LMConfig | None = None
        self._threads = threads or self.config.threads or torch.get_num_threads()

    @property
    def _mixer(self) -> _NgramMixer:
        # one table per file: shared by every batch of this codec instance, in file order
        if self._mixer_state is None:
            self._mixer_state = _NgramMixer(self.config.orders, self.config.gamma, self.config.contexts,
                                            self.coding_model.tokenizer.alphabet)
        return self._mixer_state

    def _adapter(self, engine: Any) -> _Adapter | None:
        # one adapter per file, like the n-gram table: it carries what it learned across batches
        if not self.settings.adapt:  # always 0 for models the lean engine does not run
            return None
        if self._adapter_state is None:
            self._adapter_state = _Adapter(engine.top(), self.settings.adapt, self.settings.adapt_tokens,
                                           self.settings.adapt_rows, engine.dtype)
        return self._adapter_state

    @property
    def settings(self) -> LMConfig:
        """The config with what depends on the model and machine resolved; the header records this one.

        ``dtype=auto`` is bf16 for the lean engine on CPUs with bf16 arithmetic (it measured
        the same bits per byte as fp32 on held-out text, 1.6x faster), fp32 otherwise; adaptation
        trains the lean engine's top, so it is off (0) for models the lean engine does not run.
        """
        if self._settings is None:
            cfg = dataclasses.replace(self.config)
            cfg.dtype = self.coding_model.dtype(cfg)
            if self.coding_model.engine_kind(cfg) != "lean":
                cfg.adapt = 0.0
            self._settings = cfg
        return self._settings

    @property
    def coding_model(self) -> CodingModel:
        if self._cm is None:
            self._cm = load_coding_model(self.config.model)
        return self._cm

    def config_dict(self) -> dict:
        d = dataclasses.asdict(self.settings)
        d["threads"] = self._threads  # the decoder must use the encoder's thread count
        return d

    def header_fields(self) -> dict:
        return {"model": self.coding_model.header(), "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}

    @classmethod
    def from_header(cls, header: dict, local: dict[str, str] | None = None) -> LMCodec:
        codec: LMCodec = super().from_header(header, local)  # type: ignore[assignment]
        want = header.get("model")
        if not isinstance(want, dict):
            raise FormatError("LM header has no model record")
        cm = codec.coding_model
        have = cm.header()
        if want.get("weights_sha256") != have["weights_sha256"] or \
                want.get("tokenizer_sha256") != have["tokenizer_sha256"]:
            raise ModelMismatchError(
                f"file was coded with model {want.get('name')!r} (weights {str(want.get('weights_sha256'))[:12]}); "
                f"the model found here has weights {have['weights_sha256'][:12]}"
            )
        if header.get("torch") != torch.__version__ or \
                header.get("cpu_capability") != torch.backends.cpu.get_cpu_capability():
            logger.warning("file was coded with torch %s on %s; decoding with torch %s on %s may not be exact "
                           "(the SHA-256 check will tell)", header.get("torch"), header.get("cpu_capability"),
                           torch.__version__, torch.backends.cpu.get_cpu_capability())
        return codec

    # -- auto ------------------------------------------------------------------
    @classmethod
    def estimate_bpb(cls, sample: bytes) -> float | None:
        """Bits per byte on the first 4 KiB, coded as 4 streams (pessimistic: short contexts)."""
        part = sample[:4096]
        if len(part) < 512 or not looks_like_text(part):
            return None
        codec = cls(LMConfig(streams=4, batch=4, segment=1024))
        try:
            _ = codec.coding_model
        except ModelMismatchError:
            return None
        segs = [part[i : i + 1024] for i in range(0, len(part), 1024)]
        payloads = codec.encode_chunks(segs)
        total = sum(len(p) if p is not None else len(s) for p, s in zip(payloads, segs, strict=True))
        return 8 * total / len(part)

    # -- tokens ----------------------------------------------------------------
    def _tokens(self, chunks: list[bytes]) -> tuple[list[list[int] | None], list[bytes]]:
        """Each chunk's tokens (None: not text, or not codable) and its text-transform side data.

        Text chunks pass through :func:`toolkit.codecs.textform.forward` first: wrapped lines
        joined (``unwrap``), line numbers that count on dropped (``numbers``); the model codes
        what is left and the side data restores the rest.
        """
        tok = self.coding_model.tokenizer
        texty = [looks_like_text(c) for c in chunks]
        sides = [b""] * len(chunks)
        texts = []
        for i, (c, t) in enumerate(zip(chunks, texty, strict=True)):
            if t:
                c, sides[i] = textform.forward(c, self.config.unwrap, self.config.numbers)
                texts.append(c)
        encoded = tok.encode_batch(texts)
        it = iter(encoded)
        out = [next(it) if t else None for t in texty]
        # a token the coder's alphabet lacks (a special token) makes the chunk uncodable
        return [ids if ids is not None and all(0 <= x < tok.alphabet for x in ids) else None for ids in out], sides

    # -- the lockstep loop shared by encoder and decoder -------------------------
    def _run(self, tokens: list[list[int] | None], decoders: dict[int, tuple[Any, int]],
             encoders: dict[int, Any], costs: dict[int, list[float]] | None = None) -> dict[int, list[int]]:
        """Step all streams together. ``tokens[i]`` known (encode or replay) or None (decode ``decoders[i]``)."""
        streams = [i for i in range(len(tokens)) if tokens[i] is not None or i in decoders]
        if not streams:
            return {}
        lengths = [len(tokens[i]) if tokens[i] is not None else decoders[i][1] for i in streams]
        cm = self.coding_model
        alphabet, bos = cm.tokenizer.alphabet, cm.tokenizer.bos
        out: dict[int, list[int]] = {i: [] for i in streams if i in decoders}
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(self._threads)
        try:
            with torch.inference_mode():
                engine = cm.engine(self.settings)
                engine.reset(len(streams))
                adapter = self._adapter(engine)
                cur = torch.full((len(streams),), bos, dtype=torch.long)
                history: list[list[int]] = [[] for _ in streams]
                mixing = bool(self.config.orders)
                # finished streams leave the batch once a quarter of it is done (engines that can drop
                # rows): the steps that remain cost what the live streams need. Both sides know every
                # length, so they drop the same rows at the same step.
                compact = hasattr(engine, "select")
                rows = list(range(len(streams)))  # engine row -> index into streams
                for t in range(max(lengths)):
                    if compact:
                        live = [j for j, r in enumerate(rows) if t < lengths[r]]
                        if len(live) * 4 <= len(rows) * 3:
                            engine.select(torch.tensor(live, dtype=torch.long))
                            cur = cur[live]
                            history = [history[j] for j in live]
                            rows = [rows[j] for j in live]
                    # the adapter's logits() replaces the engine's top (the adapted head)
                    logits = (engine.step(cur, adapter) if adapter is not None else engine.step(cur))[:, :alphabet]
                    active = [t < lengths[r] for r in rows]
                    model_probs = torch.softmax(logits, dim=-1) if mixing or adapter is not None else None
                    if mixing:
                        table = entropy.probs_to_table(self._mixer.mix(model_probs, history, active))
                    else:
                        table = entropy.freqs_to_table(entropy.logits_to_freqs(logits), entropy.DEFAULT_TOTAL_BITS)
                    nxt = cur.clone()
                    for j, r in enumerate(rows):
                        if not active[j]:
                            continue
                        i = streams[r]
                        if i in decoders:
                            sym = int(decoders[i][0].decode(entropy.CATEGORICAL, table[j : j + 1])[0])
                            out[i].append(sym)
                        else:
                            sym = tokens[i][t]
                            if i in encoders:
                                encoders[i].encode(np.array([sym], dtype=np.int32), entropy.CATEGORICAL,
                                                   table[j : j + 1])
                        nxt[j] = sym
                        if costs is not None:
                            costs.setdefault(i, []).append(-math.log2(float(table[j, sym])))
                    coded = nxt.tolist()
                    if adapter is not None:
                        adapter.observe(model_probs, coded, active)
                    if mixing:
                        self._mixer.update(history, coded, active)
                    cur = nxt
                if adapter is not None:
                    adapter.flush()
        finally:
            torch.set_num_threads(prev_threads)
        return out

    def _pieces(self, lengths: dict[int, int]) -> list[tuple[int, int, int]]:
        """The streams of a batch as ``(segment, start, end)`` token ranges, in segment order."""
        order = sorted(lengths)
        ks = plan_pieces([lengths[i] for i in order], self.settings.streams, self.settings.piece)
        return [(i, a, b) for i, k in zip(order, ks, strict=True) for a, b in _cuts(lengths[i], k)]

    def _split(self, tokens: list[list[int] | None]) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
        """The plan of a batch whose tokens are all known, and each stream's tokens."""
        pieces = self._pieces({i: len(t) for i, t in enumerate(tokens) if t is not None})
        return pieces, [tokens[i][a:e] for i, a, e in pieces]  # type: ignore[index]

    def token_costs(self, data: bytes) -> list[tuple[bytes, float]]:
        """Each token of ``data`` with the bits the codec spends on it (exact table costs).

        ``data`` is cut into segments and coded as the codec would code it;
        binary segments (stored by the container) are left out.
        """
        chunks = [data[i : i + self.chunk_size] for i in range(0, len(data), self.chunk_size)]
        out: list[tuple[bytes, float]] = []
        tok = self.coding_model.tokenizer
        for b in range(0, len(chunks), self.batch_chunks):
            pieces, streams = self._split(self._tokens(chunks[b : b + self.batch_chunks])[0])
            costs: dict[int, list[float]] = {}
            self._run(streams, {}, {}, costs)
            for s, ids in enumerate(streams):
                out.extend((tok.decode([t]), c) for t, c in zip(ids, costs.get(s, []), strict=True))
        return out

    # -- codec interface -----------------------------------------------------------
    # payload of a coded segment: varint(side bytes) side varint(tokens) varint(pieces)
    # varint(words of each piece but the last)
    # then the range coder's 32-bit words of every piece, in order
    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        tokens, sides = self._tokens(chunks)
        pieces, streams = self._split(tokens)
        encoders = {s: constriction.stream.queue.RangeEncoder() for s in range(len(pieces))}
        self._run(streams, {}, encoders)
        words: dict[int, list[bytes]] = {}
        for s, (i, _, _) in enumerate(pieces):
            words.setdefault(i, []).append(encoders[s].get_compressed().tobytes())
        out: list[bytes | None] = []
        for i, c in enumerate(chunks):
            if tokens[i] is None:
                out.append(None)
                continue
            parts = words[i]
            payload = _varint(len(sides[i])) + sides[i] + _varint(len(tokens[i])) + _varint(len(parts)) + \
                b"".join(_varint(len(w) // 4) for w in parts[:-1]) + b"".join(parts)
            # the model lost to a quick zstd: let the container store it that way
            if len(payload) >= len(zstandard.ZstdCompressor(level=3).compress(c)):
                out.append(None)
            else:
                out.append(payload)
        return out

    def decode_chunks(self, payloads: list[bytes | None], sizes: list[int],
                      known: list[bytes | None]) -> list[bytes]:
        replay = self._tokens([k if k is not None else b"" for k in known])[0]
        sides: dict[int, bytes] = {}
        lengths: dict[int, int] = {}
        parsed: dict[int, list[np.ndarray]] = {}
        for i, p in enumerate(payloads):
            if p is None:
                if replay[i] is not None:
                    lengths[i] = len(replay[i])
                continue
            m, used = _read_varint(p)
            if used + m > len(p):
                raise FormatError(f"LM payload claims {m} bytes of text-transform data in {len(p)}")
            sides[i] = p[used : used + m]
            used += m
            n, u = _read_varint(p[used:])
            used += u
            if n > sizes[i]:
                raise FormatError(f"LM payload claims {n} tokens for {sizes[i]} bytes")
            k, u = _read_varint(p[used:])
            used += u
            if not 1 <= k <= max(1, n):
                raise FormatError(f"LM payload claims {k} pieces for {n} tokens")
            counts = []
            for _ in range(k - 1):
                c, u = _read_varint(p[used:])
                used += u
                counts.append(c)
            words = p[used:]
            if len(words) % 4 or 4 * sum(counts) > len(words):
                raise FormatError("LM payload is not a whole number of 32-bit words per piece")
            arr = np.frombuffer(words, dtype=np.uint32)
            edges = np.cumsum([0, *counts, len(arr) - sum(counts)])
            parsed[i] = [arr[edges[j] : edges[j + 1]].copy() for j in range(k)]
            lengths[i] = n
        pieces = self._pieces(lengths)
        planned = Counter(i for i, _, _ in pieces)
        for i, words_of in parsed.items():
            if len(words_of) != planned[i]:
                raise FormatError(f"LM payload has {len(words_of)} pieces where the plan has {planned[i]}")
        tokens: list[list[int] | None] = []
        decoders: dict[int, tuple[Any, int]] = {}
        for s, (i, a, e) in enumerate(pieces):
            if i not in parsed:
                tokens.append(replay[i][a:e])  # type: ignore[index]
                continue
            tokens.append(None)
            # pieces of a segment come in order: the first not yet taken is this one
            decoders[s] = (constriction.stream.queue.RangeDecoder(parsed[i].pop(0)), e - a)
        decoded = self._run(tokens, decoders, {})
        ids: dict[int, list[int]] = {}
        for s, (i, _, _) in enumerate(pieces):
            if s in decoded:
                ids.setdefault(i, []).extend(decoded[s])
        tok = self.coding_model.tokenizer
        return [known[i] if p is None else textform.inverse(tok.decode(ids.get(i, [])), sides[i])
                for i, p in enumerate(payloads)]

