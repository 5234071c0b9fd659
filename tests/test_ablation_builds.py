"""The ablation builds (scripts/ablation_builds.py) edit the kernel sources at fixed anchors; every anchor must
still be found exactly once in the tree's sources, or the script would stop on the device machine's time."""
import importlib.util
import pathlib

import pytest

from codegemm.ops.cuda import _SOURCES

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "ablation_builds.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("ablation_builds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["base", "nobuild", "nox", "noloop"])
def test_every_ablation_applies_to_the_tree(name):
    module = _load_script()
    sources = {src.name: src.read_text() for src in _SOURCES}
    for file_name, edit in module.ABLATIONS[name]:
        edited = edit(sources[file_name])
        assert edited != sources[file_name]


def test_a_missing_anchor_stops_the_build():
    module = _load_script()
    with pytest.raises(SystemExit, match="anchor"):
        module.replace_once("no anchor here", "for (int chunk", "")
