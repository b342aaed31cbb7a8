"""A plain (not editable) `pip install` carries the shipped model: `moejax generate` works from any
directory. And `moejax --version`.

Offline and quick: the project is installed without dependencies or build isolation into a fresh
virtual environment that sees the test environment's packages (jax, setuptools, pip) through a .pth file.
"""

import json
import os
import shutil
import site
import subprocess
import venv
from pathlib import Path

import pytest

import moejax
from moejax.cli import main as moejax_cli

REPO = Path(__file__).resolve().parent.parent


def test_a_non_editable_install_generates_with_the_shipped_model(tmp_path):
    # Install from a copy, so that the build leaves nothing in the repository.
    source = tmp_path / "source"
    shutil.copytree(REPO / "moejax", source / "moejax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    test_packages = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (Path(purelib) / "test_environment.pth").write_text("\n".join(test_packages) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--no-cache-dir", "--quiet", str(source)], env=env, capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import moejax; print(moejax.SHIPPED_CHECKPOINT)"], env=env, cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(purelib), where  # the installed copy, not the repository
    done = subprocess.run([env_dir / "bin" / "moejax", "generate", "--prompt", "hi", "--max-new-tokens", "2", "--json"],
                          env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["tokens"][0]) >= 1


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        moejax_cli(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"moejax {moejax.__version__}"
