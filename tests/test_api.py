"""The Python API takes a codec's settings as typed values; the command line's strings are parsed."""

import pytest

import toolkit
from toolkit.errors import ConfigError

TEXT = b"The API passes typed settings through to the codec's config.\n" * 8


def test_typed_settings_reach_the_config_as_they_are(codec_settings):
    lm = dict(codec_settings["lm"], orders=(1, 2))
    blob = toolkit.compress(TEXT, codec="lm", **lm)
    assert toolkit.info(blob)["header"]["config"]["orders"] == [1, 2]
    assert toolkit.decompress(blob) == TEXT


def test_typed_and_string_settings_build_the_same_file():
    typed = toolkit.compress(TEXT, codec="xz", preset=6, extreme=False)
    parsed = toolkit.compress(TEXT, codec="xz", preset="6", extreme="false")
    assert typed == parsed and toolkit.info(typed)["header"]["config"] == {"preset": 6, "extreme": False}


@pytest.mark.parametrize("settings, words", [
    ({"preset": 6.5}, "not an integer"),
    ({"preset": "six"}, "not an integer"),
    ({"extreme": 1}, "true or false"),
    ({"preset": 12}, "0..9"),
    ({"speed": 3}, "unknown setting"),
])
def test_a_bad_setting_is_a_config_error(settings, words):
    with pytest.raises(ConfigError, match=words):
        toolkit.compress(TEXT, codec="xz", **settings)


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
