""".dockerignore, read with Docker's own rules: every file the Dockerfile copies is sent, nothing a user's checkout
grows (.env with keys, venvs, checkpoints, models, runs, bench and gpu-check reports, caches, node_modules) is."""
from __future__ import annotations

import posixpath
import re
import subprocess

import pytest
from compose_yaml import ROOT

DOCKERIGNORE = ROOT / ".dockerignore"


def read_patterns(text: str) -> list[tuple[str, bool]]:
    """(pattern, is_exception) per line, cleaned as moby/patternmatcher's ignorefile.ReadAll does."""
    patterns = []
    for line in text.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        exception = pattern.startswith("!")
        pattern = posixpath.normpath(pattern.removeprefix("!").strip())
        if len(pattern) > 1 and pattern.startswith("/"):
            pattern = pattern[1:]
        patterns.append((pattern, exception))
    return patterns


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """moby/patternmatcher's translation: `*` and `?` stay within a path segment, `**` crosses any number of them."""
    regex, i = "^", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2 + (pattern[i + 2:i + 3] == "/")
            regex += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        if char == "*":
            regex += "[^/]*"
        elif char == "?":
            regex += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            regex += pattern[i:end + 1]
            i = end
        elif char == "\\":
            i += 1
            regex += re.escape(pattern[i])
        else:
            regex += re.escape(char)
        i += 1
    return re.compile(regex + "$")


def is_sent(path: str, patterns: list[tuple[str, bool]]) -> bool:
    """Whether the build context holds `path`: the last pattern matching it, or one of its parent folders, decides
    (patternmatcher's MatchesOrParentMatches)."""
    parents = ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1)]
    excluded = False
    for pattern, exception in patterns:
        regex = pattern_regex(pattern)
        if any(regex.match(candidate) for candidate in (path, *parents)):
            excluded = not exception
    return not excluded


@pytest.fixture(scope="module")
def patterns() -> list[tuple[str, bool]]:
    return read_patterns(DOCKERIGNORE.read_text())


@pytest.mark.parametrize("ignore,path,sent", [
    # Docker's documentation of .dockerignore, and its root-relative names
    ("*/temp*", "somedir/temporary.txt", False),
    ("*/temp*", "somedir/temp/file", False),
    ("*/temp*", "temp.txt", True),
    ("*/*/temp*", "somedir/subdir/temporary.txt", False),
    ("temp?", "tempa", False),
    ("temp?", "dir/tempa", True),
    ("**/*.go", "a/b/c.go", False),
    ("**/*.go", "c.go", False),
    ("*.md\n!README*.md\nREADME-secret.md", "README.md", True),
    ("*.md\n!README*.md\nREADME-secret.md", "README-secret.md", False),
    ("*.md\n!README*.md\nREADME-secret.md", "CHANGES.md", False),
    ("*\n!src/", "src/a/b.py", True),
    ("*\n!src/", "srcx/b.py", False),
    ("/models", "models/x/model.onnx", False),
])
def test_the_reader_follows_dockers_rules(ignore, path, sent):
    assert is_sent(path, read_patterns(ignore)) is sent


def dockerfile_copy_sources() -> set[str]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    sources = set()
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources.update(w.rstrip("/") for w in words[1:-1] if not w.startswith("--"))
    return sources


def test_every_file_the_dockerfile_copies_is_in_the_context(patterns):
    sources = dockerfile_copy_sources()
    assert {"pyproject.toml", "service", "locks/service-cpu.txt", "deploy/entrypoint.py"} <= sources
    for source in sorted(sources):
        # a file by its name; a folder by the files git tracks in it (not whatever else lies there: a checkpoint
        # someone keeps in model/ is meant to stay out)
        files = [source] if (ROOT / source).is_file() else subprocess.run(
            ["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        assert files, f"the Dockerfile copies {source}, which this checkout does not have"
        left_out = [path for path in files if not is_sent(path, patterns)]
        assert not left_out, f".dockerignore leaves out {left_out[:5]}, which the Dockerfile copies ({source})"


@pytest.mark.parametrize("path", [
    ".env", ".env.local", "service/.env", "deploy/.env.production",  # API keys (README "Security")
    ".venv/bin/python", "venv/bin/python", ".venv-gpu/bin/python", "env/bin/python",  # Makefile, gpu_check.sh
    "checkpoints/my_model.pth", "model/my_model.pth", "export/weights.safetensors",  # README "Bring your own"
    "models/convnext_tiny/1/model.onnx", "service/models/x/1/model.plan",  # model repositories (make demo-model)
    "runs/demo/checkpoint_best.pth", "training/runs/x/log.jsonl",  # training runs
    "bench-results/soak.json", "bench/bench-results/roadmap/x.json", "bench/reports/plot.png",  # python -m bench
    "gpu-check/report.md", "gpu-check-20260101T000000Z/logs/doctor.log",  # scripts/gpu_check.sh (README: gpu-check)
    "node_modules/playwright/package.json", "service/static/node_modules/x/index.js",
    ".cache/convnext/convnext_tiny_1k_224_ema.pth", "service/__pycache__/app.cpython-311.pyc",
    "runtime/.cache/x", ".pytest_cache/v/cache/nodeids", ".mypy_cache/3.11/x.json", ".ruff_cache/x",
    ".hypothesis/examples/x", ".schemathesis/x", "convnext_serve.egg-info/PKG-INFO", "build/lib/x.py", "dist/x.whl",
    ".git/HEAD", ".whl/torch.whl", ".gl/x", "tests/conftest.py", "docs/architecture.md", "deploy/k8s/deployment.yaml",
    "docker-compose.yml", "scripts/gpu_check.sh", "locks/dev.txt",
])
def test_nothing_but_sources_goes_into_the_context(patterns, path):
    assert not is_sent(path, patterns), f"{path} would be sent to the builder (and could be copied into an image)"
