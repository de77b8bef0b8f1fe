"""The one progress form: False, True (a bar on stderr) or a ``(done, total)`` callable."""

import io

import pytest

import toolkit
from toolkit.errors import ConfigError
from toolkit.progress import reporter


def test_a_bar_goes_to_stderr_and_closes_when_done(capsys):
    report = reporter(True, 4, "work")
    for done in range(1, 5):
        report(done, 4)
    err = capsys.readouterr().err
    assert "work" in err and "4/4" in err


def test_a_stream_of_unknown_length_ends_with_its_total():
    data = b"a stream whose size nobody told the coder " * 200
    blob = toolkit.compress(data, codec="zstd")
    seen = []
    toolkit.decompress_stream(io.BytesIO(blob), io.BytesIO(), progress=lambda d, t: seen.append((d, t)))
    assert seen[0][1] == 0  # unknown while it runs
    assert seen[-1] == (len(data), len(data))  # known at the end, so a bar can close


def test_false_says_nothing_and_a_callable_is_called_as_it_is(capsys):
    reporter(False, 3)(1, 3)
    calls = []
    reporter(lambda d, t: calls.append((d, t)), 3)(2, 3)
    assert calls == [(2, 3)] and capsys.readouterr().err == ""


def test_anything_else_is_a_config_error():
    with pytest.raises(ConfigError, match="progress"):
        reporter("yes", 3)
