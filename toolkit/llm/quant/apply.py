"""``quantize_``: replace a model's linear layers with packed quantized ones.

Which layers: every ``nn.Linear`` inside the decoder layers (the largest
``nn.ModuleList`` of blocks holding linears, ``model.model.layers`` in Llama and
Qwen2), or every ``nn.Linear`` of a model without such a list; ``lm_head``
(the output embedding) only when asked.

How: RTN codes each weight on its own. GPTQ and the outlier variant need the
Hessian of each layer's inputs, taken as llm-compressor's sequential pipeline
takes it: the inputs of the first decoder layer are captured once; then each
decoder layer in turn moves to ``device``, runs the calibration activations
with hooks that accumulate its linears' Hessians, is quantized, and runs them
again quantized to give the next layer its inputs. Peak device memory is one
decoder layer plus the activations. Everything is checked before the model is
touched, and a failure midway puts the original layers back. The handle
``quantize_`` returns keeps the float layers it replaced, so that
``handle.remove()`` can put them back.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from toolkit.errors import ConfigError, ToolkitError
from toolkit.llm.quant.config import QuantConfig
from toolkit.llm.quant.gptq import round_to_nearest, solve
from toolkit.llm.quant.linear import QuantizedLinear
from toolkit.progress import Progress, reporter

__all__ = ["quantize_", "QuantizeHandle", "find_targets", "decoder_layers", "build_calibration"]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward at the first decoder layer."""


# ----------------------------------------------------------------- targets
def _matches(name: str, patterns: Iterable[str]) -> bool:
    for pat in patterns:
        if pat.startswith("re:"):
            if re.search(pat[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pat) or name == pat or name.endswith("." + pat):
            return True
    return False


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of blocks holding the most linears, with its name, or None."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        n = sum(isinstance(m, nn.Linear) for block in mod for m in block.modules())
        if n and all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in mod):
            if best is None or n > best[0]:
                best = (n, name, mod)
    return None if best is None else (best[1], best[2])


def _output_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        for name, mod in model.named_modules():
            if mod is head:
                return name
    return None


def find_targets(model: nn.Module, ignore: Sequence[str] = (), quantize_lm_head: bool = False) -> list[str]:
    """Names of the linears ``quantize_`` would replace, in module order."""
    found = decoder_layers(model)
    head = _output_embedding_name(model)
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, QuantizedLinear):
            continue
        inside = found is None or name.startswith(found[0] + ".")
        if name == head or name.split(".")[-1] == "lm_head":
            if not quantize_lm_head:
                continue
        elif not inside:
            continue
        if _matches(name, ignore):
            continue
        names.append(name)
    return names


def _config_for(name: str, config: QuantConfig, overrides: dict | None) -> QuantConfig:
    for pat, cfg in (overrides or {}).items():
        if _matches(name, [pat]):
            return cfg
    return config


def _check_layers(model: nn.Module, targets: list[str], configs: dict[str, QuantConfig]) -> None:
    bad = []
    for name in targets:
        lin = model.get_submodule(name)
        gs = configs[name].group
        if gs is not None and lin.in_features % gs:
            bad.append(f"{name} (input width {lin.in_features})")
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ConfigError(
            f"group size does not divide the input width of {shown}; choose a group size that divides it, "
            "give those layers their own config, e.g. "
            "overrides={'re:.*down_proj': dataclasses.replace(config, group_size=64)}, "
            "or leave them out with ignore=[...]")


# ------------------------------------------------------------- calibration
def _encode(tokenizer, text: str) -> list[int]:
    if callable(tokenizer) and not hasattr(tokenizer, "encode_batch"):
        out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(ids)
    try:
        return list(tokenizer.encode(text))
    except (TypeError, AttributeError):
        # Byte-level tokenizers (this project's ByteTokenizer) take bytes.
        return list(tokenizer.encode(text.encode("utf-8")))


def build_calibration(calib, tokenizer=None, seq_len: int = 512, num_samples: int | None = None) -> list:
    """Calibration batches from texts (joined, tokenized, cut into ``seq_len`` windows) or as given."""
    if calib is None:
        raise ConfigError("this method needs calibration data: pass calib=[texts] with tokenizer=, or token batches")
    if isinstance(calib, (str, bytes, torch.Tensor)):
        calib = [calib]
    calib = list(calib)
    if not calib:
        raise ConfigError("calibration data is empty")
    if all(isinstance(c, str) for c in calib):
        if tokenizer is None:
            raise ConfigError("calibration texts need the model's tokenizer: pass tokenizer=")
        ids: list[int] = []
        for text in calib:
            ids.extend(_encode(tokenizer, text))
        if not ids:
            raise ConfigError("calibration texts tokenize to nothing")
        n = max(1, len(ids) // seq_len)
        if num_samples is not None:
            n = min(n, num_samples)
        t = torch.tensor(ids[: n * seq_len] if len(ids) >= seq_len else ids, dtype=torch.long)
        return list(t.reshape(n, -1).split(1)) if len(ids) >= seq_len else [t.unsqueeze(0)]
    if any(isinstance(c, str) for c in calib):
        raise ConfigError("calibration data mixes texts and batches")
    batches = []
    for c in calib:
        if isinstance(c, torch.Tensor):
            if c.numel() == 0:
                raise ConfigError("a calibration batch is empty")
            if c.dim() == 1 and not c.is_floating_point():
                c = c.unsqueeze(0)
        batches.append(c)
    if num_samples is not None:
        batches = batches[:num_samples]
    return batches


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    elif _is_hf(model) and isinstance(batch, torch.Tensor) and not batch.is_floating_point():
        model(input_ids=batch, use_cache=False)
    else:
        model(batch)


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _check_tokens(model: nn.Module, batches: list) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for b in batches:
        if isinstance(b, torch.Tensor) and not b.is_floating_point() and vocab is not None:
            if b.numel() and (int(b.min()) < 0 or int(b.max()) >= vocab):
                raise ConfigError(f"calibration token ids must lie in [0, {vocab}); got {int(b.min())}..{int(b.max())}")


# ------------------------------------------------------------------ hessians
class _Hessian:
    """Running ``2/n * sum x x^T`` over a linear's inputs, in float32."""

    def __init__(self, width: int, device) -> None:
        self.h = torch.zeros(width, width, device=device)
        self.n = 0

    def __call__(self, module, args, output) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2.0 / self.n)
        self.h += x.t() @ x


# ---------------------------------------------------------------- quantize
def _quantize_linear(lin: nn.Linear, cfg: QuantConfig, hessian: torch.Tensor | None, device) -> QuantizedLinear:
    w = lin.weight.detach().to(device)
    if cfg.method == "rtn":
        sol = round_to_nearest(w, cfg.bits, cfg.group, cfg.symmetric, cfg.torch_scale_dtype)
    else:
        extra = {}
        if cfg.method == "outlier":
            extra = {"outlier_fraction": cfg.outlier_fraction, "stat_bits": cfg.stat_bits,
                     "stat_group": cfg.stat_group}
        sol = solve(w, hessian.to(device), cfg.bits, cfg.group, cfg.symmetric, act_order=cfg.act_order,
                    static_groups=cfg.static_groups, damp=cfg.damp, block_size=cfg.block_size,
                    scale_dtype=cfg.torch_scale_dtype, **extra)
    q = QuantizedLinear.from_solution(lin, sol, cfg.bits, cfg.group, cfg.symmetric, cfg.torch_scale_dtype)
    q.quant_config = cfg
    return q.to(lin.weight.device)


class _Swaps:
    """Module replacements, in order, with the modules they replaced: undone in reverse."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.done: list[tuple[nn.Module, str, nn.Module]] = []

    def replace(self, name: str, new: nn.Module) -> None:
        parent_name, _, attr = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        self.done.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, new)

    def undo(self) -> None:
        for parent, attr, old in reversed(self.done):
            setattr(parent, attr, old)
        self.done.clear()


_NOT_SET = object()


class QuantizeHandle:
    """Returned by :func:`quantize_`: ``remove()`` puts the original float layers back.

    ``model`` is the quantized model (the same object ``quantize_`` was given)
    and ``targets`` the names of the layers replaced. The handle holds the
    float layers themselves, not copies, so after ``remove()`` the model has
    the very modules it had; a second ``remove()`` does nothing. Dropping the
    handle frees the float weights.
    """

    def __init__(self, model: nn.Module, targets: list[str], swaps: _Swaps, previous: object) -> None:
        self.model, self.targets = model, targets
        self._swaps, self._previous = swaps, previous

    def remove(self) -> None:
        if not self._swaps.done:
            return
        self._swaps.undo()
        if self._previous is _NOT_SET:
            self.model.__dict__.pop("quantization", None)
        else:
            self.model.quantization = self._previous

    def __enter__(self) -> QuantizeHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def quantize_(model: nn.Module, config: QuantConfig, calib=None, *, tokenizer=None, ignore: Sequence[str] = (),
              overrides: dict[str, QuantConfig] | None = None, quantize_lm_head: bool = False, device=None,
              seq_len: int | None = None, num_samples: int | None = None,
              progress: Progress = False) -> QuantizeHandle:
    """Quantize ``model`` in place with ``config``; the handle's ``remove()`` restores the float layers.

    ``calib``: texts (with ``tokenizer``) or token batches (LongTensor
    [batch, seq]; for a model that is not a Hugging Face LM, whatever its
    forward takes: a tensor, a tuple of positional arguments or a dict).
    ``ignore``: name patterns (glob, or ``re:`` regex) of linears to leave
    float. ``overrides``: pattern -> config for layers that need another
    config. ``device``: where each decoder layer is quantized (default: where
    the model is). ``progress``: a bar (True) or ``callback(done, total)``
    over the layers quantized.
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError("config must be an RTNConfig, GPTQConfig or OutlierConfig")
    for cfg in (overrides or {}).values():
        if not isinstance(cfg, QuantConfig):
            raise ConfigError("overrides must map name patterns to quantization configs")
    targets = find_targets(model, ignore, quantize_lm_head)
    if not targets:
        raise ConfigError("the model has no nn.Linear layers to quantize (after ignore=)")
    configs = {name: _config_for(name, config, overrides) for name in targets}
    _check_layers(model, targets, configs)
    first = next(model.parameters())
    device = torch.device(device) if device is not None else first.device
    needs_data = any(c.needs_data for c in configs.values())
    batches = []
    if needs_data:
        if seq_len is None:
            seq_len = min(2048, getattr(getattr(model, "config", None), "max_position_embeddings", 512) or 512)
        batches = build_calibration(calib, tokenizer, seq_len, num_samples)
        _check_tokens(model, batches)

    swaps = _Swaps(model)
    report = reporter(progress, len(targets), config.method)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not needs_data:
                for i, name in enumerate(targets):
                    swaps.replace(name, _quantize_linear(model.get_submodule(name), configs[name], None, device))
                    report(i + 1, len(targets))
            else:
                _sequential(model, targets, configs, batches, device, swaps, report)
    except BaseException as exc:
        swaps.undo()
        if isinstance(exc, (ToolkitError, KeyboardInterrupt)):
            raise
        if isinstance(exc, torch.linalg.LinAlgError):
            raise ToolkitError(f"quantization failed, the model is unchanged: {exc}") from exc
        raise
    finally:
        model.train(was_training)
    previous = getattr(model, "quantization", _NOT_SET)
    model.quantization = {"config": config.to_dict(), "ignore": list(ignore),
                          "overrides": {k: v.to_dict() for k, v in (overrides or {}).items()},
                          "targets": targets}
    return QuantizeHandle(model, targets, swaps, previous)


def _sequential(model, targets, configs, batches, device, swaps: _Swaps, report) -> None:
    """Decoder layer by decoder layer, then the linears outside them; ``report(done, total)`` counts linears."""
    found = decoder_layers(model)
    in_blocks = found is not None and any(t.startswith(found[0] + ".") for t in targets)
    rest = [t for t in targets if not (in_blocks and t.startswith(found[0] + "."))]
    if in_blocks:
        prefix, blocks = found
        inputs = _capture_first_block(model, blocks[0], batches, device)
        for i, block in enumerate(blocks):
            base = f"{prefix}.{i}"
            names = [t for t in targets if t.startswith(base + ".")]
            home = next(block.parameters()).device
            block.to(device)
            hooks, hess = [], {}
            for name in names:
                lin = model.get_submodule(name)
                if configs[name].needs_data:
                    hess[name] = _Hessian(lin.in_features, device)
                    hooks.append(lin.register_forward_hook(hess[name]))
            try:
                for args, kwargs in inputs:
                    block(*args, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            for name in names:
                h = hess.get(name)
                lin = model.get_submodule(name)
                swaps.replace(name, _quantize_linear(lin, configs[name], None if h is None else h.h, device))
                lin.to(home)  # the handle keeps the float layer where the model had it, for remove()
            del hess
            # The next layer sees what this one computes once quantized.
            inputs = [_replace_hidden(args, kwargs, _first(block(*args, **kwargs))) for args, kwargs in inputs]
            block.to(home)
            report(len(swaps.done), len(targets))
    for name in rest:
        # Outside the decoder layers (lm_head, or a model with no block list):
        # one full forward per layer, through the layers already quantized.
        lin = model.get_submodule(name)
        h = _Hessian(lin.in_features, lin.weight.device) if configs[name].needs_data else None
        if h is not None:
            hook = lin.register_forward_hook(h)
            try:
                for b in batches:
                    _run(model, b)
            finally:
                hook.remove()
        swaps.replace(name, _quantize_linear(lin, configs[name], None if h is None else h.h, device))
        report(len(swaps.done), len(targets))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return args, kwargs


def _capture_first_block(model, block, batches, device) -> list[tuple[tuple, dict]]:
    captured = []

    def hook(module, args, kwargs):
        captured.append((_to(args, device), _to(kwargs, device)))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                _run(model, b)
            except _Captured:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise ToolkitError("the calibration forward did not reach the first decoder layer")
    return captured
