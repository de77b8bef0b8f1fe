"""Quantized checkpoints: safetensors plus ``config.json``, in compressed-tensors' ``pack-quantized`` form.

``save_quantized`` writes what vLLM and ``AutoModelForCausalLM.from_pretrained``
(with compressed-tensors installed) load: per quantized linear
``weight_packed`` (int32), ``weight_scale``, ``weight_shape`` and, for an
asymmetric grid, ``weight_zero_point`` packed along the output dimension; a
``quantization_config`` whose ``config_groups`` name the layers of each
scheme and whose ``ignore`` lists the linears left float.

Two kinds of layer have no place in that format, and a checkpoint holding
any of them is written in this project's extension instead
(``quant_method: "toolkit"``, ``format: "toolkit-pack-quantized"``, described
in docs/QUANT_FORMAT.md): outlier-aware layers (coded statistics and a
sparse outlier matrix) and GPTQ layers whose groups follow activation order
(``weight_g_idx``). ``load_quantized`` reads both. Other loaders do not know
the extension: transformers skips an unknown ``quant_method`` with a warning
and would start those layers from random weights, so such a checkpoint is
for ``load_quantized`` only (docs/QUANT_FORMAT.md says so too).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import ConfigError, FormatError
from toolkit.kernels.pack import pack_int32, packed_words, unpack_int32
from toolkit.llm.quant.config import QuantConfig
from toolkit.llm.quant.linear import QuantizedLinear

__all__ = ["save_quantized", "load_quantized", "COMPRESSED_TENSORS_VERSION", "EXTENSION_FORMAT"]

# The compressed-tensors release whose layout this module writes (dense bit
# packing along the input dimension, zero points packed along the output one).
COMPRESSED_TENSORS_VERSION = "0.20.1"
EXTENSION_FORMAT = "toolkit-pack-quantized"
_EXTENSION_VERSION = 1


def _quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QuantizedLinear)}


def _scheme(q: QuantizedLinear) -> dict:
    """The compressed-tensors ``weights`` arguments of one layer."""
    # Act order with static groups changes only the sweep, so the layout is
    # the plain one; compressed-tensors calls that ordering "weight".
    cfg = getattr(q, "quant_config", None)
    ordering = "weight" if cfg is not None and getattr(cfg, "act_order", False) else None
    return {
        "num_bits": q.bits,
        "type": "int",
        "symmetric": q.symmetric,
        "strategy": "group" if q.group_size else "channel",
        "group_size": q.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": ordering,
        "observer": "minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "zp_dtype": None,
    }


def _extension_scheme(q: QuantizedLinear) -> dict:
    s = {"num_bits": q.bits, "symmetric": q.symmetric, "group_size": q.group_size,
         "g_idx": hasattr(q, "weight_g_idx"), "outliers": q.coded_stats}
    if q.coded_stats:
        s.update({"stat_bits": q.stat_bits, "stat_group": q.stat_group, "outlier_nnz": int(q.outlier_val.numel())})
    return s


def _compact_targets(names: list[str], all_linears: list[str]) -> list[str]:
    """Targets for a set of layers: one regex per leaf name where it covers exactly those layers."""
    by_leaf = defaultdict(list)
    for n in all_linears:
        by_leaf[n.rsplit(".", 1)[-1]].append(n)
    chosen, covered = [], set()
    mine = set(names)
    for leaf, members in by_leaf.items():
        if members and set(members) <= mine:
            chosen.append(f"re:.*\\.{re.escape(leaf)}$" if "." in members[0] else f"re:^{re.escape(leaf)}$")
            covered.update(members)
    chosen += [n for n in names if n not in covered]
    return chosen


def save_quantized(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write ``model`` (quantized by :func:`toolkit.llm.quantize_`) to ``directory``; returns it."""
    from safetensors.torch import save_file

    layers = _quantized_layers(model)
    if not layers:
        raise ConfigError("the model has no quantized layers; run toolkit.llm.quantize_ first")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ConfigError("save_quantized writes Hugging Face checkpoints: the model needs a transformers config")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    extension = any(q.coded_stats or hasattr(q, "weight_g_idx") for q in layers.values())
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:
            continue
        ptr = value.data_ptr()
        if ptr in seen and value.numel():
            continue  # a tied weight is stored once, as transformers does
        seen[ptr] = key
        tensors[key] = value.detach().contiguous().cpu()
    for name, q in layers.items():
        tensors[f"{name}.weight_packed"] = q.weight_packed.cpu()
        tensors[f"{name}.weight_shape"] = torch.tensor([q.out_features, q.in_features], dtype=torch.int64)
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias.detach().cpu()
        if q.coded_stats:
            for buf in ("scale_codes", "scale_step", "scale_low", "zero_codes",
                        "outlier_crow", "outlier_col", "outlier_val"):
                tensors[f"{name}.{buf}"] = getattr(q, buf).cpu()
        else:
            tensors[f"{name}.weight_scale"] = q.weight_scale.cpu()
            if not q.symmetric:
                tensors[f"{name}.weight_zero_point"] = pack_int32(q.weight_zero_point.cpu(), q.bits, dim=0)
        if hasattr(q, "weight_g_idx"):
            tensors[f"{name}.weight_g_idx"] = q.weight_g_idx.cpu()

    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    groups: dict[str, list[str]] = defaultdict(list)
    schemes: dict[str, dict] = {}
    for name, q in layers.items():
        scheme = _extension_scheme(q) if extension else _scheme(q)
        key = json.dumps(scheme, sort_keys=True)
        schemes[key] = scheme
        groups[key].append(name)
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(groups) == 1 else _compact_targets(names, list(layers)),
            "weights": schemes[key], "input_activations": None, "output_activations": None,
            "format": EXTENSION_FORMAT if extension else "pack-quantized",
        }
    ignore = [n for n in linears if n not in layers]
    if extension:
        qcfg = {"quant_method": "toolkit", "format": EXTENSION_FORMAT, "version": _EXTENSION_VERSION,
                "description": "toolkit extension of compressed-tensors pack-quantized; see docs/QUANT_FORMAT.md",
                "config_groups": config_groups, "ignore": ignore}
    else:
        qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "version": COMPRESSED_TENSORS_VERSION,
                "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
                "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}
    quant = getattr(model, "quantization", None)
    if quant:
        qcfg["toolkit"] = {"config": quant["config"], "overrides": quant["overrides"], "ignore": quant["ignore"]}

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    get_head = getattr(model, "get_output_embeddings", None)
    if cfg.get("tie_word_embeddings") and callable(get_head) and isinstance(get_head(), QuantizedLinear):
        # A quantized head is no longer the embedding: loaders must not tie them.
        cfg["tie_word_embeddings"] = False
    cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(out)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    elif tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(out)
    return out


# --------------------------------------------------------------------- load
def _layer_scheme(name: str, module: nn.Module, config_groups: dict) -> dict | None:
    """The scheme of the first group whose targets match, in compressed-tensors' order: name, regex, class."""
    for exact in (True, False):
        for group in config_groups.values():
            for target in group.get("targets", []):
                if exact and target == name:
                    return group["weights"]
                if not exact and target.startswith("re:") and re.match(target[3:], name):
                    return group["weights"]
    for group in config_groups.values():
        if type(module).__name__ in group.get("targets", []):
            return group["weights"]
    return None


def _matches_ignore(name: str, ignore: list[str]) -> bool:
    return any(name == ig or (ig.startswith("re:") and re.match(ig[3:], name)) for ig in ignore)


def _shell(lin: nn.Linear, scheme: dict, extension: bool, state: dict, name: str) -> QuantizedLinear:
    bits = scheme.get("num_bits")
    if bits not in (2, 3, 4, 8):
        raise FormatError(f"{name}: num_bits {bits!r} is not one this loader reads")
    gs = scheme.get("group_size")
    if scheme.get("strategy", "group") == "channel":
        gs = None
    if gs is not None and (not isinstance(gs, int) or gs < 1 or lin.in_features % gs):
        raise FormatError(f"{name}: group_size {gs!r} does not divide the input width {lin.in_features}")
    outliers = bool(scheme.get("outliers")) if extension else False
    nnz = 0
    if outliers:
        val = state.get(f"{name}.outlier_val")
        if val is None:
            raise FormatError(f"{name}: outlier layer without outlier_val")
        nnz = val.numel()
    g_idx = (bool(scheme.get("g_idx")) if extension else False)
    q = QuantizedLinear(lin.in_features, lin.out_features, bits, gs, symmetric=bool(scheme.get("symmetric", True)),
                        bias=lin.bias is not None, act_groups=g_idx, coded_stats=outliers,
                        stat_bits=int(scheme.get("stat_bits", 3)), stat_group=int(scheme.get("stat_group", 16)),
                        outlier_nnz=nnz, dtype=lin.weight.dtype,
                        scale_dtype=state[f"{name}.weight_scale"].dtype if f"{name}.weight_scale" in state
                        else torch.float16)
    return q


def load_quantized(directory: str | Path, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` (either format) as a model of ``QuantizedLinear``s."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise FormatError(f"{d}: no config.json") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{d}/config.json is not JSON: {exc}") from None
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise FormatError(f"{d}: config.json has no quantization_config")
    method, fmt = qcfg.get("quant_method"), qcfg.get("format")
    extension = method == "toolkit"
    if not ((method == "compressed-tensors" and fmt == "pack-quantized") or (extension and fmt == EXTENSION_FORMAT)):
        raise FormatError(f"{d}: quantization {method!r}/{fmt!r} is not pack-quantized")
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise FormatError(f"{d}: quantization_config has no config_groups")
    try:
        state = load_file(str(d / "model.safetensors"))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise FormatError(f"{d}/model.safetensors cannot be read: {exc}") from None

    hf_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    config = transformers.AutoConfig.for_model(**hf_cfg)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ignore = list(qcfg.get("ignore") or [])
    shells = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or _matches_ignore(name, ignore):
            continue
        scheme = _layer_scheme(name, mod, groups)
        if scheme is None or f"{name}.weight_packed" not in state:
            if scheme is not None or f"{name}.weight_packed" in state:
                raise FormatError(f"{d}: {name} is quantized in the config or the tensors but not both")
            continue
        shells[name] = _shell(mod, scheme, extension, state, name)
    if not shells:
        raise FormatError(f"{d}: no layer of the model matches the quantization config")
    for name, q in shells.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, q)
        shape = state.pop(f"{name}.weight_shape", None)
        if shape is not None and shape.tolist() != [q.out_features, q.in_features]:
            raise FormatError(f"{name}: weight_shape {shape.tolist()} disagrees with the model "
                              f"[{q.out_features}, {q.in_features}]")
        zp = state.get(f"{name}.weight_zero_point")
        if zp is not None and not q.coded_stats:
            groups_n = q.weight_scale.shape[1]
            if zp.dtype != torch.int32 or tuple(zp.shape) != (packed_words(q.out_features, q.bits), groups_n):
                raise FormatError(f"{name}: weight_zero_point {tuple(zp.shape)} {zp.dtype} disagrees with the config")
            state[f"{name}.weight_zero_point"] = unpack_int32(zp, q.bits, q.out_features, dim=0)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = model.state_dict()
    problems = []
    for key, want in expected.items():
        got = state.get(key)
        if got is None:
            if tied and key.endswith("lm_head.weight"):
                continue
            problems.append(f"missing {key}")
        elif tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype and not got.is_floating_point():
            problems.append(f"{key}: {tuple(got.shape)} {got.dtype}, the config says {tuple(want.shape)} {want.dtype}")
    extra = sorted(set(state) - set(expected))
    if extra:
        problems.append("unexpected " + ", ".join(extra[:3]))
    if problems:
        raise FormatError(f"{d}: the tensors disagree with the config: " + "; ".join(problems[:4]))
    for name, q in shells.items():
        _check_layer(name, q, state)
    model.load_state_dict(state, strict=False)
    # A quantized lm_head has no weight to tie (its input embedding stays float).
    if tied and hasattr(model, "tie_weights") and not isinstance(model.get_output_embeddings(), QuantizedLinear):
        model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    toolkit_info = qcfg.get("toolkit")
    if isinstance(toolkit_info, dict) and isinstance(toolkit_info.get("config"), dict):
        try:
            model.quantization = {"config": QuantConfig.from_dict(toolkit_info["config"]).to_dict(),
                                  "overrides": toolkit_info.get("overrides", {}),
                                  "ignore": toolkit_info.get("ignore", []), "targets": list(shells)}
        except ConfigError:
            pass
    return model.eval()


def _check_layer(name: str, q: QuantizedLinear, state: dict) -> None:
    """Values a shape check cannot see: group indices and the outlier matrix's structure."""
    g = state.get(f"{name}.weight_g_idx")
    if g is not None:
        groups = q.in_features // (q.group_size or q.in_features)
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
            raise FormatError(f"{name}: weight_g_idx names a group outside 0..{groups - 1}")
    if q.coded_stats:
        crow, col = state[f"{name}.outlier_crow"].long(), state[f"{name}.outlier_col"].long()
        if crow[0] != 0 or int(crow[-1]) != col.numel() or bool((crow[1:] < crow[:-1]).any()):
            raise FormatError(f"{name}: outlier_crow is not a valid row index")
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= q.in_features):
            raise FormatError(f"{name}: outlier_col outside the input width")
        codes = state[f"{name}.scale_codes"]
        if codes.numel() and int(codes.max()) >= (1 << q.stat_bits):
            raise FormatError(f"{name}: scale_codes outside {q.stat_bits} bits")

