"""Registry (built-ins + entry-point plugins), pipeline specs, TOML configs, option parsing."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import onnx
import pytest

import onnxopt
from onnxopt import OptionsError, Pass, PassResult, RegistryError, option
from onnxopt.pipeline import build_options, from_specs, from_toml, split_spec
from onnxopt.registry import Registry, load_registry
from tests.helpers import relu_model

PLUGIN_SRC = Path(__file__).parent / "plugin_pkg"


def install_plugin_metadata(site: Path, entry_points: str) -> Path:
    """Make the demo plugin importable with real distribution metadata (as pip would), without pip."""
    info = site / "onnxopt_demo_plugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxopt-demo-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[onnxopt.passes]\n{entry_points}\n")
    return site


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    def make(entry_points: str) -> Path:
        site = install_plugin_metadata(tmp_path / "site", entry_points)
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.syspath_prepend(str(PLUGIN_SRC))
        return site
    return make


def test_builtins_are_registered_from_onnxopt_passes():
    reg = load_registry(plugins=False)
    assert {"fold-bn", "cleanup"} <= set(reg.names())
    assert reg.source("fold-bn") == "builtin: onnxopt.passes.fold_bn"


def test_plugin_from_entry_point_runs(plugin_on_path):
    plugin_on_path("relu-to-clip = onnxopt_demo_plugin:ReluToClip")
    reg = load_registry()
    assert reg.source("relu-to-clip").startswith("plugin: onnxopt-demo-plugin")
    [p] = from_specs(["relu-to-clip:max_nodes=1"], reg)
    result = onnxopt.optimize(relu_model(), [p])
    assert [n.op_type for n in result.model.graph.node] == ["Clip"]
    assert result.record.passes[0].stats == {"rewritten": 1}
    assert result.ok


def test_duplicate_pass_name_is_an_error(plugin_on_path):
    plugin_on_path("cleanup = onnxopt_demo_plugin.dup:CollidingCleanup")
    with pytest.raises(RegistryError, match="duplicate pass name 'cleanup'.*builtin: onnxopt.passes.cleanup.*plugin"):
        load_registry()


def test_broken_plugin_is_reported(plugin_on_path):
    plugin_on_path("ghost = onnxopt_demo_plugin:DoesNotExist")
    with pytest.raises(RegistryError, match="cannot load entry point 'ghost'"):
        load_registry()


def test_plugin_through_cli_subprocess(tmp_path):
    site = install_plugin_metadata(tmp_path / "site", "relu-to-clip = onnxopt_demo_plugin:ReluToClip")
    model = tmp_path / "m.onnx"
    onnx.save_model(relu_model(), str(model))
    env = {"PYTHONPATH": f"{site}:{PLUGIN_SRC}", "PATH": "/usr/bin:/bin"}
    listing = subprocess.run([sys.executable, "-m", "onnxopt.cli", "passes"], capture_output=True, text=True, env=env)
    assert listing.returncode == 0, listing.stderr
    assert "relu-to-clip" in listing.stdout and "max_nodes" in listing.stdout
    res = subprocess.run(
        [sys.executable, "-m", "onnxopt.cli", "run", str(model), "-o", str(tmp_path / "o.onnx"), "-p", "relu-to-clip"],
        capture_output=True, text=True, env=env,
    )
    assert res.returncode == 0, res.stderr
    assert [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node] == ["Clip"]


# -- specs and options -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoOptions:
    ratio: float = option(0.3, help="fraction")
    count: int = option(2, help="count")
    flag: bool = option(False, help="flag")
    mode: Literal["a", "b"] = option("a", help="mode")
    exclude: tuple[str, ...] = option((), help="patterns")
    per_layer: dict[str, float] = option(None, help="overrides")  # type: ignore[assignment]
    path: Optional[str] = option(None, help="a path")


class Demo(Pass):
    """Demo pass for option parsing."""

    name = "demo"
    Options = DemoOptions

    def run(self, graph, ctx):
        return PassResult(False, {"skipped_demo": 1})


def demo_registry() -> Registry:
    reg = Registry()
    reg.add(Demo, "test")
    return reg


def test_split_spec_keeps_commas_inside_list_values():
    assert split_spec("demo:ratio=0.5,exclude=conv1,stem*,flag=true") == (
        "demo", {"ratio": "0.5", "exclude": "conv1,stem*", "flag": "true"}
    )
    assert split_spec("demo") == ("demo", {})


def test_options_are_typed():
    [p] = from_specs(["demo:ratio=0.5,count=3,flag=yes,mode=b,exclude=conv1,stem*,per_layer=layer1*:0.2,fc:0"],
                     demo_registry())
    o = p.options
    assert (o.ratio, o.count, o.flag, o.mode, o.exclude) == (0.5, 3, True, "b", ("conv1", "stem*"))
    assert o.per_layer == {"layer1*": 0.2, "fc": 0.0} and o.path is None


@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown pass 'nope'; available passes: demo"),
    ("demo:colour=red", "has no option 'colour'; valid options: count, exclude, flag, mode, path, per_layer, ratio"),
    ("demo:count=1.5", "expected an integer"),
    ("demo:flag=maybe", "expected true/false"),
    ("demo:mode=c", "'c' is not one of a, b"),
    ("demo:ratio=x", "expected a number"),
    ("demo:count=1,count=2", "given twice"),
    ("demo:justtext", "is not key=value"),
])
def test_bad_specs_list_valid_choices(spec, message):
    with pytest.raises(OptionsError) as e:
        from_specs([spec], demo_registry())
    assert message in str(e.value)


def test_toml_pipeline(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[pass]]\nname = "demo"\nratio = 0.25\nexclude = ["a", "b"]\n\n[[pass]]\nname = "demo"\n')
    ps = from_toml(cfg, demo_registry())
    assert [p.options.ratio for p in ps] == [0.25, 0.3] and ps[0].options.exclude == ("a", "b")
    cfg.write_text('[[pass]]\nname = "demo"\nratio = "lots"\n')
    with pytest.raises(OptionsError, match="expected a number"):
        from_toml(cfg, demo_registry())
    cfg.write_text('[[pass]]\nratio = 1\n')
    with pytest.raises(OptionsError, match="has no name"):
        from_toml(cfg, demo_registry())
    cfg.write_text("not = [toml")
    with pytest.raises(OptionsError, match="not valid TOML"):
        from_toml(cfg, demo_registry())


def test_keyword_options_checked():
    with pytest.raises(OptionsError, match="valid options"):
        Demo(colour="red")
    assert build_options(Demo, {"count": 5}).count == 5


def test_passes_command_lists_options(capsys):
    from onnxopt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["passes"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name in load_registry().names():
        assert name in out
    assert "standalone" in out  # fold-bn's option with its help


def test_cli_unknown_pass_exit_2(tmp_path, capsys):
    from onnxopt.cli import main

    model = tmp_path / "m.onnx"
    onnx.save_model(relu_model(), str(model))
    with pytest.raises(SystemExit) as e:
        main(["run", str(model), "-p", "fold-bm"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown pass 'fold-bm'; available passes:" in err and "fold-bn" in err
    assert not (tmp_path / "m.opt.onnx").exists()
