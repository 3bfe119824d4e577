"""The import arrows point one way (STYLE.md "The shape of the house"): `qlora_core` imports none of the
service's packages, `service` (the shared base) none of the packages standing on it, `api` never
torch nor the worker, and only `qlora_cli` (the entry points) may import everything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "qlora_core": {"api", "worker", "inference", "service", "qlora_cli"},
    "service": {"api", "worker", "inference", "qlora_core", "qlora_cli"},
    "api": {"worker", "inference", "qlora_cli", "torch", "transformers", "peft", "bitsandbytes"},
    "worker": {"api", "inference", "qlora_cli"},
    "inference": {"api", "worker", "qlora_cli"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str) -> None:
    wrong = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package])
             for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in wrong.items() if v} == {}
