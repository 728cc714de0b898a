"""What the Comfy Registry and the front-end read from the pack: checked on the files themselves.

Front-end extension names live in one namespace shared by every installed pack, so ours start with
the pack's namespace as comfy-test's lint derives it (`[tool.comfy] DisplayName` lowercased, letters
and digits only: "lycorisnodepack"); the Registry reads only Homepage/Documentation/Repository/Issues
from `[project.urls]`; the Registry zip leaves the development folders out (.comfyignore).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_extension_names_are_under_the_pack_namespace():
    namespace = re.sub(r"[^a-z0-9]", "", _pyproject()["tool"]["comfy"]["DisplayName"].lower())
    names = []
    for script in sorted((ROOT / "web" / "js").glob("*.js")):
        text = script.read_text(encoding="utf-8")
        names += re.findall(r"registerExtension\(\{\s*name:\s*\"([^\"]+)\"", text)
        assert text.count("registerExtension(") == len(re.findall(r"registerExtension\(\{\s*name:", text)), script
    assert names, "no front-end extension found"
    assert all(name.startswith(namespace + ".") for name in names), names


def test_registry_fields():
    project, comfy = _pyproject()["project"], _pyproject()["tool"]["comfy"]
    assert set(project["urls"]) <= {"Homepage", "Documentation", "Repository", "Issues"}, project["urls"]
    assert {"Repository", "Issues"} <= set(project["urls"])
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])


def test_comfyignore_leaves_out_development_folders():
    patterns = {line.strip() for line in (ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")}
    assert {"tests/", "bench/", ".ci/", "scripts/"} <= patterns
    # what the pack needs at run time, and the README's image, stay in
    assert not any(p.startswith(("web", "nodes", "lycoris_core", "example_workflows", "docs")) for p in patterns)
