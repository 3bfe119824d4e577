"""Turn a `POST /v1/fine_tuning/jobs` request into a resolved, validated training configuration.

OpenAI's `hyperparameters` (or `method.supervised.hyperparameters`) map onto
`qlora_core.config.TrainConfig`; everything else comes from the `qlora` extension object or the
QLoRA paper's defaults. How "auto" resolves (documented in the README):
- `n_epochs`: 3, OpenAI's usual default for small datasets.
- `batch_size`: 4 examples (or packed rows) per micro-batch; with TrainConfig's 4
  gradient-accumulation steps that is the QLoRA recipe's effective batch of 16.
- `learning_rate_multiplier`: 1.0, where learning_rate = 2e-4 (the paper's) × multiplier.
  An explicit `qlora.learning_rate` wins, and the multiplier reported is learning_rate / 2e-4.
"""

from __future__ import annotations

import secrets
from typing import Any

from api.errors import bad_request
from api.schemas import BASE_LEARNING_RATE, DpoHyperparameters, Hyperparameters, JobCreate
from qlora_core.config import TrainConfig

AUTO_N_EPOCHS = 3
AUTO_BATCH_SIZE = 4
AUTO_BETA = 0.1  # OpenAI's and TRL's default DPO beta
MAX_SUFFIX = 64
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


def _hyperparameters(req: JobCreate) -> tuple[Hyperparameters, str]:
    """The requested hyperparameters and the param path they came from (by the method's type)."""
    kind = method_type(req)
    if kind == "dpo":
        if req.hyperparameters is not None:
            raise bad_request("A DPO job takes its hyperparameters in method.dpo.hyperparameters; the top-level "
                              "'hyperparameters' are for supervised jobs.", param="hyperparameters",
                              code="invalid_value")
        hp = req.method.dpo.hyperparameters if req.method and req.method.dpo else None
        return hp or DpoHyperparameters(), "method.dpo.hyperparameters"
    method_hp = req.method.supervised.hyperparameters if req.method and req.method.supervised else None
    if method_hp is not None and req.hyperparameters is not None:
        raise bad_request(
            "Give hyperparameters either at the top level or in method.supervised, not both.",
            param="hyperparameters",
            code="invalid_value",
        )
    if method_hp is not None:
        return method_hp, "method.supervised.hyperparameters"
    return req.hyperparameters or Hyperparameters(), "hyperparameters"


def method_type(req: JobCreate) -> str:
    """"supervised" or "dpo"; anything else (OpenAI's "reinforcement" among them) is a 400 naming it."""
    if req.method is None:
        return "supervised"
    kind = req.method.type
    if kind == "reinforcement":
        raise bad_request("The 'reinforcement' fine-tuning method is not supported by this service; use "
                          "'supervised' or 'dpo'.", param="method.type", code="invalid_value")
    if kind not in ("supervised", "dpo"):
        raise bad_request(f"Unsupported fine-tuning method {kind!r}: use 'supervised' or 'dpo'.",
                          param="method.type", code="invalid_value")
    other = "dpo" if kind == "supervised" else "supervised"
    extras = sorted(req.method.model_extra or {})
    if getattr(req.method, other) is not None or extras:
        extra = other if getattr(req.method, other) is not None else extras[0]
        raise bad_request(f"method.type is {kind!r}, but method.{extra} is given; give only method.{kind}.",
                          param=f"method.{extra}", code="invalid_value")
    return kind


def hyperparameters_param(req: JobCreate) -> str:
    """Where the request's hyperparameters live, as a param path for error messages."""
    if req.method is not None and req.method.type == "dpo":
        return "method.dpo.hyperparameters"
    if req.method is not None and req.method.supervised and req.method.supervised.hyperparameters is not None:
        return "method.supervised.hyperparameters"
    return "hyperparameters"


def _check_int(value: Any, lo: int, hi: int, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad_request(f"Invalid value for '{param}': must be \"auto\" or an integer between {lo} and {hi}, "
                          f"got {value!r}.", param=param, code="invalid_value")
    return value


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    """OpenAI's metadata rule: at most 16 pairs, string keys <= 64 and string values <= 512 characters."""
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA_PAIRS:
        raise bad_request(f"metadata may hold at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}.",
                          param="metadata", code="invalid_value")
    for k, v in metadata.items():
        if len(k) > MAX_METADATA_KEY:
            raise bad_request(f"metadata keys must be at most {MAX_METADATA_KEY} characters, got {len(k)} ({k[:20]!r}...).",
                              param="metadata", code="invalid_value")
        if not isinstance(v, str) or len(v) > MAX_METADATA_VALUE:
            raise bad_request(f"metadata[{k!r}] must be a string of at most {MAX_METADATA_VALUE} characters.",
                              param="metadata", code="invalid_value")
    return dict(metadata)


def resolve_config(req: JobCreate, parent: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Validate a job request and resolve it into a TrainConfig.

    Args:
        req: the parsed request body.
        parent: the resolved config of the fine-tuned model's job when the job continues one: its
            adapter's shape (rank, alpha, target modules) is inherited, and a different one refused.

    Returns:
        (config, requested_hyperparameters, method): `config` is `TrainConfig.to_dict()` with every
        "auto" resolved, `requested_hyperparameters` keeps "auto" as sent, `method` is OpenAI's
        method object with the resolved hyperparameters.

    Raises:
        APIError: 400 naming the param of the first bad value.
    """
    if req.suffix is not None and len(req.suffix) > MAX_SUFFIX:
        raise bad_request(f"suffix must be at most {MAX_SUFFIX} characters, got {len(req.suffix)}.",
                          param="suffix", code="invalid_value")
    if req.seed is not None and not 0 <= req.seed <= 2**31 - 1:
        raise bad_request(f"seed must be between 0 and 2147483647, got {req.seed}.", param="seed", code="invalid_value")
    if req.integrations:
        raise bad_request("integrations are not supported by this service.", param="integrations", code="invalid_value")

    kind = method_type(req)
    hp, hp_param = _hyperparameters(req)
    n_epochs = AUTO_N_EPOCHS if hp.n_epochs in (None, "auto") else _check_int(hp.n_epochs, 1, 50, f"{hp_param}.n_epochs")
    batch_size = (AUTO_BATCH_SIZE if hp.batch_size in (None, "auto")
                  else _check_int(hp.batch_size, 1, 256, f"{hp_param}.batch_size"))
    lrm = hp.learning_rate_multiplier
    if lrm in (None, "auto"):
        multiplier = 1.0
    elif isinstance(lrm, bool) or not isinstance(lrm, (int, float)) or not 0 < lrm <= 1000:
        raise bad_request(f"Invalid value for '{hp_param}.learning_rate_multiplier': must be \"auto\" or a number "
                          f"> 0, got {lrm!r}.", param=f"{hp_param}.learning_rate_multiplier", code="invalid_value")
    else:
        multiplier = float(lrm)

    options = req.qlora.model_dump(exclude_none=True) if req.qlora is not None else {}
    options.setdefault("learning_rate", BASE_LEARNING_RATE * multiplier)
    if kind == "dpo":
        beta = getattr(hp, "beta", "auto")
        if beta in (None, "auto"):
            beta = AUTO_BETA
        elif isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 2:
            raise bad_request(f"Invalid value for '{hp_param}.beta': must be \"auto\" or a number in (0, 2], "
                              f"got {beta!r}.", param=f"{hp_param}.beta", code="invalid_value")
        options.update(method="dpo", dpo_beta=float(beta))
    for name in ADAPTER_SHAPE if parent is not None else ():  # See Note: continuing a fine-tuned model
        if name in options and options[name] != parent.get(name):
            raise bad_request(f"Invalid value for 'qlora.{name}': {req.model} was trained with {name}="
                              f"{parent.get(name)!r}, and training continues its adapter, so it must stay "
                              f"{parent.get(name)!r}.", param=f"qlora.{name}", code="invalid_value")
        options[name] = parent.get(name)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31 - 1)
    try:
        config = TrainConfig.from_dict({**options, "n_epochs": n_epochs, "batch_size": batch_size, "seed": seed})
    except (TypeError, ValueError) as e:  # from_dict refuses unknown keys; the schema already did too
        raise bad_request(str(e), param="qlora", code="invalid_value") from None
    problems = config.validate()
    if problems:
        name, message = problems[0]
        param = {"n_epochs": f"{hp_param}.n_epochs", "batch_size": f"{hp_param}.batch_size"}.get(name, f"qlora.{name}")
        raise bad_request(f"Invalid value for '{param}': {message}.", param=param, code="invalid_value")

    cfg = config.to_dict()
    requested = hp.model_dump()
    resolved = {
        "batch_size": batch_size,
        "learning_rate_multiplier": round(cfg["learning_rate"] / BASE_LEARNING_RATE, 10),
        "n_epochs": n_epochs,
    }
    if kind == "dpo":
        method = {"type": "dpo", "dpo": {"hyperparameters": {**resolved, "beta": cfg["dpo_beta"]}}}
    else:
        method = {"type": "supervised", "supervised": {"hyperparameters": resolved}}
    return cfg, requested, method


# Note: continuing a fine-tuned model. A job whose `model` is one of the tenant's fine-tuned models
# loads that model's adapter as its starting weights, so the adapter's shape must be the one it
# was saved with: lora_r, lora_alpha and target_modules are inherited from the model's job, and a
# request for another value is a 400 naming it. The base model is the fine-tuned model's base.
ADAPTER_SHAPE = ("lora_r", "lora_alpha", "target_modules")

