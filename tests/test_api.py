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
