"""qlora_core: the QLoRA training engine (Dettmers et al., 2023, arXiv 2305.14314).

Turns (base model, JSONL dataset, `TrainConfig`) into a standard PEFT adapter: the base is frozen
in 4-bit NormalFloat with double quantization (bitsandbytes), LoRA adapters train on every linear
layer (PEFT), compute runs in bf16, and a paged AdamW optimizer updates the adapters.

This package imports neither `api` nor `worker` (nor celery/fastapi). Importing `qlora_core`
itself, `qlora_core.config` and `qlora_core.validate` does not import torch, so the API can reuse
the config defaults and the dataset validator.
"""

from qlora_core.config import TrainConfig  # noqa: F401  (torch-free)
