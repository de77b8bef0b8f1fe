"""The Python API takes a codec's settings as typed values; only the command line's ``--set`` strings are parsed."""

import pytest

import toolkit
from toolkit.cli import main
from toolkit.codecs.classic import XzConfig
from toolkit.codecs.lm import LMConfig
from toolkit.codecs.registry import parse_settings
from toolkit.errors import ConfigError

TEXT = b"The API passes typed settings through to the codec's config.\n" * 8


def test_typed_settings_reach_the_config_as_they_are(codec_settings):
    lm = dict(codec_settings["lm"], orders=(1, 2))
    blob = toolkit.compress(TEXT, codec="lm", **lm)
    assert toolkit.info(blob)["header"]["config"]["orders"] == [1, 2]
    assert toolkit.decompress(blob) == TEXT


def test_command_line_strings_build_the_file_typed_settings_build(tmp_path):
    src = tmp_path / "text.txt"
    src.write_bytes(TEXT)
    typed = toolkit.compress(TEXT, codec="xz", preset=6, extreme=False)
    assert main(["compress", str(src), "--codec", "xz", "--set", "preset=6", "--set", "extreme=false", "-q"]) == 0
    assert (tmp_path / "text.txt.tkz").read_bytes() == typed
    assert toolkit.info(typed)["header"]["config"] == {"preset": 6, "extreme": False}


def test_the_command_line_parses_strings_by_the_field_type():
    assert parse_settings(XzConfig, {"preset": "0x6", "extreme": "no"}) == {"preset": 6, "extreme": False}
    assert parse_settings(LMConfig, {"orders": "[2, 1]", "gamma": "4", "model": "none"}) == \
        {"orders": [2, 1], "gamma": 4.0, "model": "none"}  # "none" is None only where a field may be None
    for strings, words in [({"preset": "six"}, "not an integer"), ({"extreme": "maybe"}, "true or false"),
                           ({"speed": "3"}, "unknown setting"), ({"orders": "[1,"}, "valid JSON")]:
        with pytest.raises(ConfigError, match=words):
            parse_settings(LMConfig if "orders" in strings else XzConfig, strings)


@pytest.mark.parametrize("settings, words", [
    ({"preset": 6.5}, "not an integer"),
    ({"preset": "six"}, "not an integer"),
    ({"preset": "6"}, "not an integer"),  # the API parses no strings: "6" is not 6
    ({"extreme": "false"}, "true or false"),
    ({"extreme": 1}, "true or false"),
    ({"preset": 12}, "0..9"),
    ({"speed": 3}, "unknown setting"),
    ({"version": 1}, "unknown setting"),
])
def test_a_bad_setting_is_a_config_error(settings, words):
    with pytest.raises(ConfigError, match=words):
        toolkit.compress(TEXT, codec="xz", **settings)


def test_a_string_is_no_number_for_any_codec(codec_settings):
    with pytest.raises(ConfigError, match="XzConfig: preset='6' is not an integer"):
        toolkit.compress(TEXT, codec="xz", preset="6")
    with pytest.raises(ConfigError, match="ZstdConfig: level='3' is not an integer"):
        toolkit.compress(TEXT, codec="zstd", level="3")
    with pytest.raises(ConfigError, match="LMConfig: window='24' is not an integer"):
        toolkit.compress(TEXT, codec="lm", **dict(codec_settings["lm"], window="24"))


def test_a_sequence_setting_refuses_a_scalar(codec_settings):
    with pytest.raises(ConfigError, match="not a list"):
        toolkit.compress(TEXT, codec="lm", **dict(codec_settings["lm"], orders=3))


def test_progress_is_done_and_total():
    import io

    seen = []
    data = TEXT * 50
    toolkit.compress_stream(io.BytesIO(data), io.BytesIO(), codec="zstd", size=len(data),
                            progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (len(data), len(data))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    out, back = io.BytesIO(), []
    toolkit.compress_stream(io.BytesIO(data), out, codec="zstd", size=len(data))
    toolkit.decompress_stream(io.BytesIO(out.getvalue()), io.BytesIO(), progress=lambda d, t: back.append(d))
    assert back[-1] == len(data)


def test_progress_refuses_what_is_neither_a_flag_nor_a_callable():
    import io

    with pytest.raises(ConfigError, match="progress"):
        toolkit.compress_stream(io.BytesIO(TEXT), io.BytesIO(), codec="zstd", progress="yes")
