"""The training configuration: one flat, torch-free dataclass with the QLoRA paper's defaults.

Defaults follow `artidoro/qlora` (`qlora.py`) and the paper: NF4 with double quantization,
bf16 compute where the device has it natively (`compute_dtype="auto"`, qlora_core/device.py),
LoRA r=64 / alpha=16 on all linear layers, paged AdamW 32-bit, lr 2e-4 constant
with 3% warmup, max_grad_norm 0.3, gradient checkpointing, loss on the target only.
The API validates user input against the same ranges (`TrainConfig.validate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_8bit", "adamw_torch")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
OVERLONG = ("truncate", "drop")
METHODS = ("supervised", "dpo")
MAX_LORA_R = 512  # vLLM's largest --max-lora-rank: every adapter we write stays servable there


@dataclass
class TrainConfig:
    """Everything a run needs besides the model and the data. Flat on purpose (torchtune-style)."""

    # LoRA (paper: r=64, alpha=16 on all linear layers of the blocks)
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    # quantization of the frozen base (paper section 3)
    quant_type: str = "nf4"
    double_quant: bool = True
    # "auto": bf16 where the device computes it natively, else fp16 (older CUDA) or fp32 (other
    # CPUs), resolved where the job runs (See Note: emulated bf16 in qlora_core/device.py)
    compute_dtype: str = "auto"
    # optimisation
    optimizer: str = "paged_adamw_32bit"
    learning_rate: float = 2e-4
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    n_epochs: int = 1
    max_steps: int | None = None  # overrides n_epochs when set
    batch_size: int = 4  # examples (or packed rows) per micro-batch
    gradient_accumulation_steps: int = 4
    gradient_checkpointing: bool = True
    # of decoder layers checkpointed (See Note: selective checkpointing); None: as many as leave the
    # run's memory under the full-logits recipe's (qlora_core.quant.auto_checkpoint_fraction)
    checkpoint_fraction: float | None = None
    fused_layers: bool = True  # lean LoRA/RMSNorm/SwiGLU autograd (qlora_core/fused.py)
    seed: int = 42
    # data
    max_seq_length: int = 1024
    # Note: packing default. Measured on GSM8K (bench/bench_packing.py): group_by_length already
    # leaves ~2% padding, so packing has little to save, and its ~500-token rows pay for attention
    # over longer rows with a block-diagonal mask instead of SDPA's plain causal kernel: 0.85-0.89x
    # per epoch, 0.89-0.91x at the same examples per step. It also changes what batch_size counts
    # (packed rows, ~2.3 examples each). Padding keeps OpenAI's meaning of batch_size and the
    # number of updates and is faster here, so it is the default; packing is an option.
    packing: bool = False
    train_on_inputs: bool = False
    overlong: str = "truncate"  # what to do with examples longer than max_seq_length
    # logging, evaluation, checkpoints
    logging_steps: int = 1
    eval_steps: int | None = None  # None: evaluate at each checkpoint (when a validation set is given)
    n_checkpoints: int | None = None  # None: one per epoch; the last is always the final step
    checkpoint_steps: int | None = None  # explicit interval, overrides n_checkpoints
    max_eval_examples: int | None = None
    # the method (OpenAI's `method.type`): supervised fine-tuning, or DPO on preference pairs with
    # its beta (qlora_core/dpo.py); set through the API's `method` object, not `qlora`
    method: str = "supervised"
    dpo_beta: float = 0.1

    def validate(self) -> list[tuple[str, str]]:
        """Return every problem as (param, message); empty when the config is valid."""
        problems: list[tuple[str, str]] = []

        def bad(param: str, msg: str) -> None:
            problems.append((param, msg))

        if self.lora_r < 1 or self.lora_r > MAX_LORA_R:
            bad("lora_r", f"lora_r must be between 1 and {MAX_LORA_R} (the largest rank vLLM serves), got {self.lora_r}")
        if self.lora_alpha <= 0:
            bad("lora_alpha", f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                bad("target_modules", "target_modules must be 'all-linear' or a list of module names")
        elif not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            bad("target_modules", "target_modules must be a non-empty list of module names")
        if self.quant_type not in QUANT_TYPES:
            bad("quant_type", f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            bad("compute_dtype", f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_scheduler not in SCHEDULERS:
            bad("lr_scheduler", f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if not self.learning_rate > 0 or self.learning_rate > 1:
            bad("learning_rate", f"learning_rate must be in (0, 1], got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad("warmup_ratio", f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if not 1 <= self.n_epochs <= 50:
            bad("n_epochs", f"n_epochs must be between 1 and 50, got {self.n_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"max_steps must be >= 1, got {self.max_steps}")
        if not 1 <= self.batch_size <= 256:
            bad("batch_size", f"batch_size must be between 1 and 256, got {self.batch_size}")
        if not 1 <= self.gradient_accumulation_steps <= 1024:
            bad("gradient_accumulation_steps", "gradient_accumulation_steps must be between 1 and 1024")
        if not 16 <= self.max_seq_length <= 131072:
            bad("max_seq_length", f"max_seq_length must be between 16 and 131072, got {self.max_seq_length}")
        if self.checkpoint_fraction is not None and not 0.0 <= self.checkpoint_fraction <= 1.0:
            bad("checkpoint_fraction", f"checkpoint_fraction must be in [0, 1], got {self.checkpoint_fraction}")
        if self.overlong not in OVERLONG:
            bad("overlong", f"overlong must be one of {OVERLONG}, got {self.overlong!r}")
        if self.logging_steps < 1:
            bad("logging_steps", f"logging_steps must be >= 1, got {self.logging_steps}")
        if self.eval_steps is not None and self.eval_steps < 1:
            bad("eval_steps", f"eval_steps must be >= 1, got {self.eval_steps}")
        if self.n_checkpoints is not None and not 1 <= self.n_checkpoints <= 100:
            bad("n_checkpoints", f"n_checkpoints must be between 1 and 100, got {self.n_checkpoints}")
        if self.checkpoint_steps is not None and self.checkpoint_steps < 1:
            bad("checkpoint_steps", f"checkpoint_steps must be >= 1, got {self.checkpoint_steps}")
        if self.method not in METHODS:
            bad("method", f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.dpo_beta <= 2.0:
            bad("dpo_beta", f"beta must be in (0, 2], got {self.dpo_beta}")
        if self.method == "dpo" and self.packing:
            bad("packing", "packing is not available with DPO: each preference pair is one chosen and one "
                           "rejected row of its own")
        return problems

    def check(self) -> "TrainConfig":
        """Raise ValueError naming every bad field; return self when valid."""
        problems = self.validate()
        if problems:
            raise ValueError("; ".join(msg for _, msg in problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, refusing unknown keys (a typo must not be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)
