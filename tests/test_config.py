import json

import pytest

from codegemm import CodebookConfig, ConfigError


@pytest.mark.parametrize(
    "name, fields",
    [
        ("m2v8g128", (2, 8, 8, 128)),
        ("m1v4g128", (1, 8, 4, 128)),
        ("m2b6v8g128", (2, 6, 8, 128)),
        ("m4b2v16g64", (4, 2, 16, 64)),
        ("m1b16v8", (1, 16, 8, None)),
        ("m3v4", (3, 8, 4, None)),
    ],
)
def test_name_round_trip(name, fields):
    config = CodebookConfig.from_name(name)
    assert (config.num_codebooks, config.nbits, config.vec_len, config.group_size) == fields
    assert config.name == name
    assert CodebookConfig.from_name(config.name) == config
    assert CodebookConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_b8_not_in_name_and_g_minus_one_is_per_row():
    assert CodebookConfig(2, 8, 8, 128).name == "m2v8g128"
    assert CodebookConfig.from_name("m2v8g-1") == CodebookConfig(2, 8, 8, None)
    assert CodebookConfig(2, 8, 8, -1).group_size is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_codebooks=0), "num_codebooks"),
        (dict(num_codebooks=9), "num_codebooks"),
        (dict(nbits=0), "nbits"),
        (dict(nbits=17), "nbits"),
        (dict(vec_len=0), "vec_len"),
        (dict(vec_len=8, group_size=12), "group_size"),
        (dict(group_size=0), "group_size"),
        (dict(num_codebooks=2.0), "num_codebooks"),
    ],
)
def test_invalid_fields_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        CodebookConfig(**kwargs)


@pytest.mark.parametrize("bad", ["", "m2v8g", "v8m2", "m2v8g128x", "m2b8"])
def test_bad_names(bad):
    with pytest.raises(ConfigError, match="name"):
        CodebookConfig.from_name(bad)


def test_frozen():
    config = CodebookConfig()
    with pytest.raises(Exception):
        config.nbits = 4


def test_bits_per_weight_counts_codes_scales_codebooks_exactly():
    config = CodebookConfig.from_name("m2v8g128")
    n = k = 4096
    expected = (n * (k // 8) * 2 * 8 + n * (k // 128) * 16 + 2 * 256 * 8 * 16) / (n * k)
    assert config.bits_per_weight(n, k) == pytest.approx(expected, rel=1e-12)
    assert 2.12 < expected < 2.14
    per_row = CodebookConfig(1, 16, 8, None)
    assert per_row.bits_per_weight(n, k) == pytest.approx(
        (n * (k // 8) * 16 + n * 16 + 65536 * 8 * 16) / (n * k), rel=1e-12
    )


def test_check_layer_names_the_dimension():
    config = CodebookConfig.from_name("m2v8g128")
    with pytest.raises(ConfigError, match="in_features=100"):
        config.check_layer(64, 100)
    with pytest.raises(ConfigError, match="group_size=128"):
        config.check_layer(64, 136)
