"""Finding, skipping and swapping linear layers (codegemm.surgery)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from codegemm import CodebookConfig, CodeGEMMLinear, ConfigError
from codegemm.surgery import (
    get_module,
    iter_linears,
    make_shell,
    matches_skip,
    quantized_modules,
    replace_linears,
    set_module,
    skipped_linears,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=True)
        self.down_proj = nn.Linear(128, 64, bias=False)
        self.norm = nn.LayerNorm(64)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 64)
        self.layers = nn.ModuleList([Block(), Block(), Block()])
        self.lm_head = nn.Linear(64, 50, bias=False)


def names(pairs):
    return [name for name, _ in pairs]


def test_iter_linears_skips_lm_head_and_never_embeddings():
    found = names(iter_linears(Toy()))
    assert "lm_head" not in found
    assert not any("embed" in n for n in found)
    assert len(found) == 6
    assert found[0] == "layers.0.q_proj"


def test_default_skip_can_be_turned_off():
    assert "lm_head" in names(iter_linears(Toy(), default_skip=False))


@pytest.mark.parametrize(
    "skip, skipped",
    [
        ("layers.1.q_proj", {"layers.1.q_proj"}),  # exact name
        ("down_proj", {"layers.0.down_proj", "layers.1.down_proj", "layers.2.down_proj"}),  # suffix
        ("layers.2", {"layers.2.q_proj", "layers.2.down_proj"}),  # ancestor
        ("re:^layers\\.[01]\\.q", {"layers.0.q_proj", "layers.1.q_proj"}),  # regex string
        (re.compile(r"2\.down"), {"layers.2.down_proj"}),  # compiled regex
        (["layers.0.q_proj", "re:down"], {"layers.0.q_proj", "layers.0.down_proj", "layers.1.down_proj",
                                           "layers.2.down_proj"}),
    ],
)
def test_skip_list_forms(skip, skipped):
    model = Toy()
    all_linears = set(names(iter_linears(model)))
    assert set(names(iter_linears(model, skip))) == all_linears - skipped
    assert set(skipped_linears(model, skip)) == skipped | {"lm_head"}


def test_string_entries_match_whole_components():
    assert matches_skip("model.lm_head", "lm_head")
    assert not matches_skip("model.xlm_head", "lm_head", default_skip=False)
    assert not matches_skip("layers.10.q_proj", "layers.1", default_skip=False)
    assert matches_skip("model.layers.1.mlp.up_proj", "layers.1", default_skip=False)
    assert matches_skip("model.layers.1.mlp.up_proj", "mlp", default_skip=False)
    assert not matches_skip("model.layers.1.mlp.up_proj", "up", default_skip=False)


def test_bad_skip_entries_are_refused():
    with pytest.raises(ConfigError, match="skip entries"):
        list(iter_linears(Toy(), [3]))
    with pytest.raises(ConfigError, match="not a valid regex"):
        list(iter_linears(Toy(), ["re:("]))


def test_set_module_and_get_module():
    model = Toy()
    new = nn.Identity()
    set_module(model, "layers.1.down_proj", new)
    assert model.layers[1].down_proj is new
    assert get_module(model, "layers.1.down_proj") is new
    with pytest.raises(ConfigError, match="does not exist"):
        set_module(model, "layers.1.nope", nn.Identity())
    with pytest.raises(ConfigError, match="does not exist"):
        get_module(model, "layers.9")
    with pytest.raises(ConfigError, match="non-empty"):
        set_module(model, "", nn.Identity())


def test_replace_linears_on_meta_allocates_nothing_and_keeps_shapes():
    with torch.device("meta"):
        model = Toy()
    config = CodebookConfig(2, 8, 8, 64)
    replaced = replace_linears(model, config, skip="layers.2")
    assert replaced == ["layers.0.q_proj", "layers.0.down_proj", "layers.1.q_proj", "layers.1.down_proj"]
    layer = model.layers[0].down_proj
    assert isinstance(layer, CodeGEMMLinear)
    assert (layer.in_features, layer.out_features, layer.bias) == (128, 64, None)
    assert model.layers[0].q_proj.bias is not None
    assert all(t.device.type == "meta" for t in (layer.codes, layer.codebooks, layer.scales))
    assert isinstance(model.layers[2].q_proj, nn.Linear) and isinstance(model.lm_head, nn.Linear)
    assert names(quantized_modules(model)) == replaced


def test_replace_linears_real_device_and_dtype():
    model = Toy()
    replace_linears(model, "m1v4g32", device="cpu", dtype=torch.bfloat16)
    layer = model.layers[1].q_proj
    assert layer.codebooks.dtype == torch.bfloat16 and layer.codes.device.type == "cpu"
    assert layer.codes.dtype == torch.uint8


def test_replace_linears_by_names_and_checks_before_changing_anything():
    model = Toy()
    assert replace_linears(model, "m2v8g64", names=["layers.0.q_proj"]) == ["layers.0.q_proj"]
    with pytest.raises(ConfigError, match="must be an nn.Linear"):
        replace_linears(model, "m2v8g64", names=["layers.0.norm"])
    model = Toy()
    # group 128 divides down_proj's K=128 but not q_proj's K=64: nothing may be swapped
    with pytest.raises(ConfigError, match="layers.0.q_proj"):
        replace_linears(model, "m2v8g128")
    assert not list(quantized_modules(model))


def test_make_shell_names_the_layer_when_config_does_not_divide():
    with pytest.raises(ConfigError, match="'blk.q'.*multiple of vec_len"):
        make_shell(nn.Linear(30, 8), "m2v8", name="blk.q")
