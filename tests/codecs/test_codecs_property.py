"""Every registered codec round-trips arbitrary bytes, and never grows beyond store."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import toolkit
from toolkit.codecs.registry import list_codecs
from toolkit.errors import UnsupportedInputError

# Learned codecs are slow per call; they get fewer examples (and their own tests).
FAST = {"store", "zstd", "xz"}
# Codecs of structured files (pc: PNG images and .npy records; kv: KV-cache bitstreams) refuse other bytes
# with a clear error instead of silently storing them.
STRUCTURED = {"pc", "kv", "weights"}
blobs = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=2000).map(lambda s: s.encode("utf-8")),
    st.lists(st.sampled_from([b"ab", b"the ", b"\x00", b"\xff\xfe", b"\n"]), max_size=400).map(b"".join),
)


@pytest.mark.parametrize("name", sorted(n for n, c in list_codecs().items() if not c.lossy))
def test_roundtrip_random_bytes(name, codec_settings):
    n = 60 if name in FAST else 8
    settings_ = codec_settings.get(name, {})

    @settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=blobs)
    def run(data):
        try:
            blob = toolkit.compress(data, codec=name, **settings_)
        except UnsupportedInputError:
            assert name in STRUCTURED and data
            return
        assert toolkit.decompress(blob) == data
        store = toolkit.compress(data, codec="store")
        header_extra = len(toolkit.compress(b"", codec=name, **settings_)) - len(toolkit.compress(b"", codec="store"))
        assert len(blob) <= len(store) + header_extra + 16

    run()


@settings(max_examples=40, deadline=None)
@given(data=blobs)
def test_auto_roundtrip(data):
    assert toolkit.decompress(toolkit.compress(data)) == data
