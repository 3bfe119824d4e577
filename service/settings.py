"""One settings object, read from `QLORA_*` environment variables, shared by api and worker.

Every default hangs off `QLORA_DATA_DIR`, so a single variable gives a complete, private
installation (the embedded mode): SQLite for the database, kombu's SQLAlchemy transport on
SQLite for the Celery broker, and local directories for uploads, artifacts and base models.
Production sets `QLORA_DATABASE_URL=postgresql+psycopg://...` and `QLORA_BROKER_URL=redis://...`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "qlora"


class Settings(BaseSettings):
    """Configuration of the whole service; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="QLORA_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str = ""  # default: sqlite under data_dir
    broker_url: str = ""  # default: sqla+sqlite under data_dir (no server)
    artifacts_dir: Path | None = None  # default: data_dir/artifacts
    files_dir: Path | None = None  # default: data_dir/files
    models_dir: Path | None = None  # default: data_dir/models
    max_upload_bytes: int = 512 * 1024 * 1024
    # Where datasets, base models and artifacts live (service/objectstore.py): a path or file:// URL
    # (default: the data dir), or s3://BUCKET/PREFIX, with which the three dirs above become this
    # host's cache (default data_dir/cache/...) and API and workers share nothing on disk.
    storage_url: str = ""
    s3_endpoint_url: str = ""  # a non-AWS S3 endpoint (MinIO, moto's server); credentials: AWS_* variables
    cache_max_bytes: int = 50 * 1024**3  # with s3://, the cached base models and datasets kept at most (LRU)

    # API
    host: str = "127.0.0.1"
    port: int = 8000
    rate_limit_per_minute: int = 600  # requests per API key per minute (429 beyond)
    max_concurrent_jobs: int = 4  # unfinished jobs per API key
    dev_tenant: str = "dev"
    # The inference server the API proxies /v1/chat/completions and /v1/completions to
    # (api/routes/inference.py); empty: none configured, and those endpoints answer 503.
    inference_url: str = ""
    inference_timeout_s: float = 600.0  # longest wait for a whole answer (or between two stream chunks)
    # The inference server itself (`qlora infer`; `qlora serve` starts one and points inference_url at it)
    inference_host: str = "127.0.0.1"  # it trusts its caller (the API): loopback or a private network only
    inference_port: int = 8001
    inference_max_batch: int = 16  # choices decoded together at most
    inference_max_adapter_bytes: int = 2 * 1024**3  # LRU budget for the adapters held beside each base model
    # On a CPU without bitsandbytes' fused 4-bit kernel (no AVX512-BF16), a base whose 4-bit layers
    # fit this dequantized is kept dequantized too, so decoding skips dequantizing every weight per
    # token (inference/adapters.py, Note: dense weights for CPU decoding); 0: never
    inference_dense_max_bytes: int = 2 * 1024**3

    # Workers
    # Webhooks (service/webhooks.py): by default only https:// endpoints on public addresses;
    # true allows http:// and loopback or private addresses (development and tests).
    webhook_allow_insecure: bool = False
    # GET /metrics: with a token, only `Authorization: Bearer <token>`; without, loopback clients only.
    metrics_token: str = ""
    webhook_poll_s: float = 2.0  # how often each API process looks for events to send
    job_time_limit_s: int = 24 * 3600
    lease_s: int = 60  # a job whose holder has not heart-beaten for this long is taken over
    heartbeat_s: int = 10
    reconcile_interval_s: int = 30
    device_memory_bytes: int | None = None  # override the worker's detected device memory
    n_logged_steps_max: int = 1000

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'qlora.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        self.storage_url = self.storage_url.strip()
        root = self.data_dir / "cache" if self.storage_is_s3 else self.data_dir
        if self.storage_url and not self.storage_is_s3:
            root = Path(self.storage_url.removeprefix("file://")).expanduser()
        self.artifacts_dir = Path(self.artifacts_dir or root / "artifacts").expanduser()
        self.files_dir = Path(self.files_dir or root / "files").expanduser()
        self.models_dir = Path(self.models_dir or root / "models").expanduser()
        self.s3_endpoint_url = self.s3_endpoint_url.strip().rstrip("/")
        self.inference_url = self.inference_url.strip().rstrip("/")
        return self

    @property
    def storage_is_s3(self) -> bool:
        """True when QLORA_STORAGE_URL names an S3 bucket (the local dirs are then only a cache)."""
        return self.storage_url.startswith("s3://")

    @property
    def embedded(self) -> bool:
        """True when nothing but local files backs the service (SQLite + serverless broker)."""
        return self.database_url.startswith("sqlite") and self.broker_url.startswith("sqla+sqlite")

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.artifacts_dir, self.files_dir, self.models_dir):
            Path(d).mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests clear it with `get_settings.cache_clear()`)."""
    return Settings()
