"""A non-editable install must carry the manifests and model configs, and CI must run the README's command."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert m, "README.md must mark its test command with <!-- test-command -->"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command():
    cmd = readme_test_command()
    assert "pytest" in cmd and "\n" not in cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci, ".ci/run must take the command from README.md"
    out = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-command"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == cmd


def test_wheel_carries_manifests_and_works_when_installed(tmp_path):
    src = tmp_path / "src"  # build from a copy so the checkout gets no build/ or egg-info
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "featcache", "cli", "data_manifests", "benchmarks/sweeps"):
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(p, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("featcache-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    manifests = sorted(Path(n).stem for n in names if n.startswith("featcache/data_manifests/") and n.endswith(".json"))
    assert manifests == sorted(p.stem for p in (ROOT / "data_manifests").glob("*.json"))
    assert "featcache/model_configs/featcache-tiny.json" in names and "cli/main.py" in names
    assert "featcache/sweeps/digits.toml" in names  # the demo's sweep
    sources = {str(p.relative_to(ROOT)) for d in ("featcache", "cli") for p in (ROOT / d).rglob("*.py")}
    assert sources <= set(names), f"modules missing from the wheel: {sorted(sources - set(names))}"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    code = (
        "import featcache.manifests as m, featcache.backbones as b; print(m.manifest_dir()); "
        "print(len(m.load_manifest('digits').classnames)); print(b.parse_backbone('featcache-tiny/random').kind); "
        "import featcache.demo as d, featcache.sweep as s; print(len(s.load_sweep(d.sweep_file('digits')).jobs))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    where, n, kind, jobs = out.stdout.split()
    assert where.startswith(str(target)) and n == "10" and kind == "random" and jobs == "45"
