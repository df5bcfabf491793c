"""Fast start: what the cached-feature commands import must not pull in open_clip, torchvision or torch._dynamo
(together about a second and a half on a laptop); they load only where a backbone runs or something trains."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("open_clip", "torchvision", "torch._dynamo")


def _loaded_after(code: str) -> list[str]:
    """The HEAVY modules in sys.modules after running `code` in a fresh interpreter."""
    probe = code + f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_importing_the_library_and_the_cli_loads_no_backbone_code():
    assert _loaded_after("import featcache.api, featcache.adapters, featcache.evaluate, featcache.leaderboard\n"
                         "from cli import main") == []  # fmt: skip


def test_methods_are_all_registered_without_loading_open_clip():
    # coop's module is imported (its @register line runs), open_clip only when it runs a text encoder
    code = "from featcache.adapters import config_help, list_adapters\nassert 'coop' in list_adapters()\n"
    code += "assert any(k == 'n_ctx' for k, _, _ in config_help('coop'))"
    assert _loaded_after(code) == []


def test_zero_shot_fit_and_ls_on_a_cached_store_load_no_backbone_code(digits_store):
    cache = digits_store.parent.parent
    code = textwrap.dedent(f"""
        from typer.testing import CliRunner
        from cli.main import app
        for argv in (["fit", "--adapter", "zero-shot", "--dataset", "digits", "--backbone", "featcache-tiny/random",
                      "--cache-dir", {str(cache)!r}], ["ls", "--cache-dir", {str(cache)!r}]):
            r = CliRunner().invoke(app, argv)
            assert r.exit_code == 0, r.output
        assert "digits" in r.output
    """)
    assert _loaded_after(code) == []


def test_a_training_fit_still_works_after_the_lazy_dynamo_import(digits_store):
    # torch._dynamo is imported inside fit() for methods that train: the optimiser's first step finds it loaded
    code = textwrap.dedent(f"""
        from featcache.api import fit_method
        fit_method("clip-adapter", dataset="digits", backbone="featcache-tiny/random",
                   cache_dir={str(digits_store.parent.parent)!r}, shots=2, options={{"epochs": 1}})
    """)
    assert _loaded_after(code) == ["torch._dynamo"]
