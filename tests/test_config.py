"""The shared check of every config: a value of the wrong type is a ConfigError naming the config, the field
and the value (never a TypeError from inside a config's own checks), and values are normalised on the way."""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from pathlib import Path

import numpy as np
import pytest

from toolkit.config import Config
from toolkit.errors import ConfigError

#: every module that defines configs (the recipes' too)
MODULES = ["toolkit.audio.config", "toolkit.circuits.em", "toolkit.codecs.audio", "toolkit.codecs.classic",
           "toolkit.codecs.lm", "toolkit.codecs.pc", "toolkit.codecs.registry", "toolkit.codecs.weights",
           "toolkit.llm.kvcache.config", "toolkit.llm.kvcache.header", "toolkit.llm.quant.config",
           "toolkit.models.lm", "toolkit.vision.mod", "toolkit.vision.sam.mobilesam", "toolkit.vision.sam.slimsam",
           "toolkit.vision.tokens", "toolkit.vision.vlm", "toolkit.weights.memory"] + [
    f"toolkit.recipes.{name}" for name in ("build_audio_data", "build_corpus", "calibrate_lm", "ship_sam",
                                           "train_audio", "train_lm", "train_patch", "train_sam", "train_vlm")]
#: values for the fields a config requires, where the type's plain value would not do
REQUIRED = {"TokenDropConfig": {"method": "fastv"}, "BuildCorpusConfig": {"out": Path("x")},
            "ProcessorConfig": {"image_size": 64, "num_image_tokens": 16, "image_token_id": 3, "pad_token_id": 0,
                                "bos_token_id": 1}}
PLAIN = {int: 1, float: 1.0, str: "x", Path: Path("x"), bool: True}
WRONG = {int: "zzz", float: "zzz", bool: 1, str: 3, Path: 3}


def _configs() -> list[type[Config]]:
    for name in MODULES:
        importlib.import_module(name)
    found, todo = [], list(Config.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if dataclasses.is_dataclass(cls) and cls.__module__.startswith("toolkit."):
            found.append(cls)
    return sorted(set(found), key=lambda c: c.__name__)


def _scalar(tp) -> type | None:
    if typing.get_origin(tp) in (typing.Union, type(int | None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    if typing.get_origin(tp) is tuple:
        return tuple
    return tp if tp in PLAIN else None


def _base(cls: type[Config]) -> dict:
    hints = typing.get_type_hints(cls)
    out = dict(REQUIRED.get(cls.__name__, {}))
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in out:
            out[f.name] = PLAIN[_scalar(hints[f.name])]
    return out


CONFIGS = _configs()


def test_every_config_is_found():
    names = {c.__name__ for c in CONFIGS}
    assert {"LMShape", "LMConfig", "ZstdConfig", "SlimConfig", "DistillConfig", "AudioNetConfig", "MoDConfig",
            "TrainVLMConfig", "TrainSamConfig", "KVHeader", "OutlierConfig"} <= names


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_a_value_of_the_wrong_type_is_a_config_error_naming_the_field(cls):
    base = _base(cls)
    cls(**base)  # the plain values build
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _scalar(hints[f.name])
        if kind is None:
            continue
        bad = [WRONG[kind]] if kind is not tuple else ["zzz", 3]
        if kind is float:
            bad.append(math.nan)
        for value in bad:
            with pytest.raises(ConfigError, match=f"{cls.__name__}: {f.name}="):
                cls(**{**base, f.name: value})


def test_values_are_normalised():
    from toolkit.codecs.classic import ZstdConfig
    from toolkit.codecs.lm import LMConfig
    from toolkit.recipes.train_patch import TrainPatchConfig

    level = ZstdConfig(level=np.int64(5)).level
    assert level == 5 and type(level) is int  # numpy integers are ints (and JSON writes them)
    cfg = LMConfig(gamma=4, orders=[np.int32(3), 1], adapt=np.float32(0.5))
    assert type(cfg.gamma) is float and cfg.orders == (1, 3) and all(type(k) is int for k in cfg.orders)
    assert type(cfg.adapt) is float
    assert TrainPatchConfig(out="runs/patch").out == Path("runs/patch")
    with pytest.raises(ConfigError, match="ZstdConfig: level=True is not an integer"):
        ZstdConfig(level=True)


def test_the_shared_check_runs_before_the_configs_own_checks():
    from toolkit.llm.kvcache.config import GEARConfig
    from toolkit.models.lm import LMShape

    with pytest.raises(ConfigError, match="LMShape: num_heads='4' is not an integer"):
        LMShape(num_heads="4")  # its own check would divide by it
    with pytest.raises(ConfigError, match="GEARConfig: bits='2' is not an integer"):
        GEARConfig(bits="2")  # a subclass's field checked once, for the subclass
    with pytest.raises(ConfigError, match="GEARConfig: rank=None"):
        GEARConfig(rank=None)


def test_the_header_form_has_no_version_and_takes_none():
    from toolkit.codecs.classic import XzConfig
    from toolkit.codecs.registry import Codec, register_codec
    from toolkit.vision.sam.slimsam import SlimConfig

    assert XzConfig().to_dict() == {"preset": 9, "extreme": True}
    with pytest.raises(ConfigError, match="unknown setting"):
        XzConfig.from_dict({"preset": 9, "version": 1})
    assert SlimConfig().to_dict()["version"] == SlimConfig.version
    assert SlimConfig.from_dict(SlimConfig(lr=1e-3).to_dict()) == SlimConfig(lr=1e-3)

    @dataclasses.dataclass(frozen=True)
    class Versioned(Config):
        level: int = 1

    with pytest.raises(TypeError, match="versioned"):
        register_codec("test-versioned")(type("VersionedCodec", (Codec,), {"Config": Versioned}))
