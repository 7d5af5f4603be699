"""One typed settings object per process, from the environment (prefix SUPIR_), built by `get_settings`."""

from __future__ import annotations

import json
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRET = "dev-only-secret-change-me"
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_.]{1,32}$")
MIN_SECRET_CHARS = 32


def _placeholder(value: str) -> bool:
    """The development default, or an example file's `change-me…` value."""
    return value == PLACEHOLDER_SECRET or "change-me" in value.lower()


class ApiKey(BaseModel):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    sha256: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")
    rate_limit_per_minute: int | None = Field(None, ge=1, description="overrides the service default")
    read_rate_limit_per_minute: int | None = Field(None, ge=1, description="overrides the service default")
    max_active_jobs: int | None = Field(None, ge=1, description="overrides the service default")
    share_weight: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="this key's share of the GPUs while keys wait (jobs.fairshare): a key of weight 2 starts two "
        "jobs for each one of a key of weight 1",
    )


class Settings(BaseSettings):
    """Everything the service reads from its environment. Field `x` is read from SUPIR_X."""

    # an empty variable (`SUPIR_VARIANTS=` from a compose file or a ConfigMap) means unset, not an unparsable value
    model_config = SettingsConfigDict(env_prefix="SUPIR_", extra="ignore", env_ignore_empty=True)

    environment: Literal["dev", "production"] = "dev"
    # Redis: job records, progress, rate limits (the store) and Celery's broker; everything we write is under
    # key_prefix. Clients are built in one place, jobs.redis_conn.
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = Field(None, description="Celery's broker, when not the store's Redis (SUPIR_REDIS_URL)")
    redis_password: SecretStr | None = Field(None, description="for store, broker and probes (from a Secret)")
    redis_sentinels: str = Field(
        "",
        description="'host:port,host:port' of Redis Sentinels: the master is found through them (both URLs' "
        "hosts are then ignored, their database numbers kept)",
    )
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: SecretStr | None = None
    redis_socket_timeout_s: float = Field(10.0, gt=0, description="a Redis command waits at most this")
    redis_connect_timeout_s: float = Field(5.0, gt=0)
    redis_memory_reserve: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="new jobs are refused (503 queue_full) once Redis uses more than 1 - this of its maxmemory: "
        "the rest is kept for accepted jobs to run, end and be read (Redis refuses writes when full)",
    )
    key_prefix: str = "supir"
    queue: str = "supir"
    # storage of inputs and results
    storage: Literal["local", "s3"] = "local"
    local_dir: Path = Path("data")
    s3_bucket: str = "supir"
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = Field(
        None, description="the endpoint clients reach, for result URLs, when it differs (compose: MinIO on localhost)"
    )
    s3_region: str = "us-east-1"
    s3_path_style: bool = False
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_connect_timeout_s: float = Field(3.0, gt=0)
    s3_read_timeout_s: float = Field(10.0, gt=0)
    s3_max_attempts: int = Field(3, ge=1, description="tries per S3 call (botocore standard retries with backoff)")
    retention_hours: float = Field(
        24.0,
        gt=0,
        description="an ended job, its record and files are kept this long; the default and the maximum of a "
        "request's expires_after",
    )
    expiry_sweep_s: float = Field(
        60.0, gt=0, description="how often the light worker's beat erases the files of jobs past their expires_at"
    )
    batch_sweep_s: float = Field(
        15.0,
        gt=0,
        description="how often the light worker's beat sends due batch webhooks and ends a batch whose last job's "
        "process died before ending it",
    )
    max_batch_items: int = Field(500, ge=1, le=10_000, description="photos one POST /v1/batches may hold")
    max_batch_upload_bytes: int = Field(
        100_000_000,
        ge=1,
        description="largest multipart POST /v1/batches (its photos together; each is also held to "
        "SUPIR_MAX_UPLOAD_BYTES); larger batches name direct uploads instead",
    )
    delete_after_delivery: bool = Field(
        False,
        description="zero retention: a restoration is erased (as DELETE does) once every sample has been downloaded "
        "through GET /v1/jobs/{id}/result",
    )
    upload_url_expires_s: int = Field(
        900, ge=1, description="how long the URL (or S3 POST policy) of POST /v1/uploads accepts the bytes"
    )
    upload_retention_s: int = Field(
        3600, ge=1, description="an upload no job has used is erased this long after it was made"
    )
    usage_retention_days: float = Field(
        400.0,
        gt=0,
        description="days each key's daily usage stays readable after the day ends (a year's bills), "
        "apart from job retention",
    )
    # HTTP
    public_url: str = "http://127.0.0.1:8000"
    signing_secret: SecretStr = SecretStr(PLACEHOLDER_SECRET)
    dev_mode: bool = False  # no API keys; only for a server bound to localhost
    api_keys: list[ApiKey] = Field(default_factory=list)
    api_keys_file: Path | None = Field(
        None, description="a file holding SUPIR_API_KEYS' JSON (a mounted Secret): re-read within ~1 s of a change"
    )
    rate_limit_per_minute: int = Field(120, ge=1, description="creates and cancels per key a minute")
    read_rate_limit_per_minute: int = Field(
        1200, ge=1, description="reads per key a minute (status, lists, results, event streams): polling is cheap"
    )
    max_active_jobs: int = Field(8, ge=1, description="queued + running jobs per key")
    max_prefer_wait_s: float = Field(60.0, ge=0, description="the longest `Prefer: wait=N` holds a create request")
    max_upload_bytes: int = Field(25_000_000, ge=1)
    max_json_bytes: int = Field(1_000_000, ge=1, description="largest JSON request body")
    drain_bytes: int = Field(
        200_000_000, ge=0, description="an over-limit body is read and dropped up to this many bytes so the 413 arrives"
    )
    header_timeout_s: float = Field(10.0, gt=0, description="a client must send its request headers within this")
    body_timeout_s: float = Field(30.0, gt=0, description="longest silence while a client sends its body")
    graceful_shutdown_s: float = Field(10.0, gt=0, description="on SIGTERM, open requests and event streams end after")
    api_admin_port: int = Field(
        8001, ge=1, le=65535, description="/metrics and /status are served here only, never on the clients' port"
    )
    auth_failures_per_minute: int = Field(30, ge=1, description="failed authentications per client address")
    max_concurrent_decodes: int = Field(2, ge=1, description="full image decodes at once per API process")
    max_concurrent_fetches: int = Field(16, ge=1, description="image_url downloads at once per API process")
    max_input_pixels: int = Field(16_000_000, ge=1)
    max_output_pixels: int = Field(64_000_000, ge=1)
    allow_private_urls: bool = False
    url_timeout_s: float = Field(15.0, gt=0)
    webhook_secret: SecretStr = SecretStr(PLACEHOLDER_SECRET)
    allow_private_webhooks: bool = False
    # results
    strip_metadata: bool = Field(False, description="never write a photo's EXIF or ICC profile into its result")
    result_cache: Literal["owner", "shared", "off"] = Field(
        "owner",
        description="a repeated request with an explicit seed is answered from the stored result: owner: only the "
        "same key's earlier jobs; shared: any key's (the same photo bytes); off: always run",
    )
    default_params: dict[str, Any] = Field(
        default_factory=dict,
        description="this deployment's defaults for restoration parameters a request leaves unset (JSON, e.g. "
        '{"min_size": 256, "steps": 8}: `make serve` sets it for the tiny test model on a CPU): above the official '
        "defaults, below a preset and the request; a job's params show every value used",
    )
    # jobs
    job_time_limit_s: int = Field(1800, ge=1)
    visibility_margin_s: int = Field(600, ge=1, description="broker redelivery waits time limit + this")
    progress_interval_s: float = Field(0.25, ge=0)
    webhook_progress_interval_s: float = Field(5.0, gt=0, description="`progress` webhooks at most this often a job")
    storage_retries: int = Field(5, ge=0, description="a job retries a failing storage call this many times")
    storage_backoff_s: float = Field(2.0, ge=0, description="first wait between storage tries; doubles each try")
    max_attempts: int = Field(3, ge=1, description="a job whose worker is lost this many times ends failed/worker_lost")
    worker_lost_after_s: float = Field(
        30.0, ge=5, description="a running job is requeued once its worker's beat is this old or names another job"
    )
    worker_load_timeout_s: int = Field(
        1800, ge=10, description="a new pool process may take this long to load the weights before Celery kills it"
    )
    worker_load_tries: int = Field(
        3, ge=1, description="loads of the weights a pool process tries before its worker exits with status 1"
    )
    worker_load_backoff_s: float = Field(30.0, ge=0, description="wait before the second load try; doubles each try")
    worker_health_port: int = Field(0, ge=0, le=65535, description="0: none; else /livez and /readyz of the worker")
    # pod marks (worker.podmarks): a GPU worker keeps its own pod's deletion cost and do-not-disrupt annotations
    # current, so scale-in and node drains take idle workers first. auto: on in a pod of the manifests (the
    # downward API's SUPIR_POD_NAME and a service-account token present)
    pod_marks: Literal["auto", "on", "off"] = "auto"
    pod_name: str | None = Field(None, description="this pod's name (the downward API); default: the host name")
    pod_namespace: str | None = Field(None, description="this pod's namespace; default: the service account's")
    kube_api_url: str | None = Field(
        None, description="the Kubernetes API; default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"
    )
    kube_credentials_dir: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount"),
        description="the service-account token, ca.crt and namespace (the token is read again at every patch)",
    )
    pod_marks_timeout_s: float = Field(3.0, gt=0, description="a patch of this pod's marks waits at most this")
    pod_marks_retry_s: float = Field(
        30.0, gt=0, description="after a failed patch, marks leave the API alone this long, then send the latest"
    )
    # weights and device (the same names as the CLI)
    sdxl_checkpoint: Path | None = None
    checkpoint: Path | None = Field(None, description="the SUPIR file of default_variant when `variants` is empty")
    # SUPIR variants (v0Q for heavy degradation, v0F for fidelity, …): name → SUPIR file, shared by the API (which
    # names it accepts, each with a queue of its own) and the workers (the files); the SDXL base is shared
    variants: dict[str, Path | None] = Field(default_factory=dict)
    default_variant: str = Field("v0Q", description="the variant of a job that names none")
    worker_variants: str = Field("", description="the variants this worker serves, comma-separated; empty: all")
    model_config_file: Path | None = Field(None, alias="SUPIR_MODEL_CONFIG")
    device: str | None = None
    dtype: str | None = None
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="0: no metrics server in the worker")
    webhooks_metrics_port: int = Field(0, ge=0, le=65535, description="0: none; else the light worker's metrics")
    ready_file: Path | None = Field(None, description="the worker touches this file once its weights are loaded")
    # speed (supir_core.speed): all off by default
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: Literal["none", "regional", "full"] = "none"
    cuda_graphs: bool = False
    compile_cache_dir: Path | None = None
    compile_dynamic: bool = Field(
        True, description="one compiled graph serves every image size (False: a graph per size, recompiled per size)"
    )
    fp8: Literal["none", "weights", "compute"] = "none"  # not exact: docs/performance.md
    offload_text: bool = False
    prompt_cache: int = Field(64, ge=0, le=10_000, description="prompt embeddings kept across jobs")
    memory_budget_gb: float | None = Field(
        None,
        gt=0,
        description="activation memory a job may use before tiling=auto tiles it; default: the device's total "
        "memory less the loaded models and 10%",
    )
    plan_cache_dir: Path | None = Field(
        Path(tempfile.gettempdir()) / "supir-memory-plans",
        description="the memory plan of tiling=auto, traced once per model and code version and kept here: a "
        "restarted worker process reads it instead of tracing again",
    )
    warmup_size: int = Field(
        0, ge=0, le=4096, description="restore a size² image before taking jobs (compiles graphs); 0: no warm-up"
    )
    # captioning (optional): a LLaVA-1.5 directory in Hugging Face format, or a hub id when online
    llava_model: str | None = None
    llava_device: str | None = None  # default: the worker's device
    llava_dtype: str | None = None
    llava_quantization: Literal["8bit", "4bit"] | None = None
    llava_keep_loaded: bool = True  # False frees its memory after every job
    llava_offload: bool = False  # True: waits in CPU memory, visits the GPU to caption
    llava_temperature: float = Field(0.2, ge=0)
    llava_top_p: float = Field(0.7, gt=0, le=1)
    llava_max_new_tokens: int = Field(512, ge=1, le=2048)
    llava_pad_to_square: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_from_json(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) and value.strip() else value or []

    @model_validator(mode="after")
    def _one_source_of_keys(self) -> Settings:
        if self.api_keys and self.api_keys_file is not None:
            raise ValueError("set SUPIR_API_KEYS or SUPIR_API_KEYS_FILE, not both: the file's keys replace the list")
        return self

    @field_validator("default_params", mode="before")
    @classmethod
    def _defaults_from_json(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) and value.strip() else value or {}

    @field_validator("default_params")
    @classmethod
    def _defaults_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        from supir_core.errors import InvalidInput
        from supir_core.params import validate_params

        try:
            validate_params(value)
        except InvalidInput as exc:
            raise ValueError(f"SUPIR_DEFAULT_PARAMS: {exc.message}") from None
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _variants_from_json(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) and value.strip() else value or {}

    @model_validator(mode="after")
    def _variants_named(self) -> Settings:
        for name in [*self.variants, self.default_variant, *self.worker_variant_names]:
            if not VARIANT_NAME.fullmatch(name):
                raise ValueError(f"variant name {name!r}: 1-32 letters, digits, '_' or '.'")
        if self.variants and self.default_variant not in self.variants:
            raise ValueError(f"SUPIR_DEFAULT_VARIANT={self.default_variant} is not in SUPIR_VARIANTS")
        unknown = set(self.worker_variant_names) - set(self.variant_files)
        if unknown:
            raise ValueError(f"SUPIR_WORKER_VARIANTS names {', '.join(sorted(unknown))}, not in SUPIR_VARIANTS")
        return self

    @property
    def retention_s(self) -> int:
        """The longest a job is kept after it ends (whole seconds, at least one): a request's expires_after bound."""
        return max(1, int(self.retention_hours * 3600))

    @property
    def usage_retention_s(self) -> float:
        return self.usage_retention_days * 86_400

    @property
    def variant_files(self) -> dict[str, Path | None]:
        """Every variant the deployment serves and its SUPIR file (None where this process was not told)."""
        return dict(self.variants) or {self.default_variant: self.checkpoint}

    @property
    def worker_variant_names(self) -> list[str]:
        """What this worker loads and consumes: SUPIR_WORKER_VARIANTS, or every variant."""
        chosen = [n.strip() for n in self.worker_variants.split(",") if n.strip()]
        return chosen or list(self.variants) or [self.default_variant]

    @model_validator(mode="after")
    def _safe_for_production(self) -> Settings:
        if self.environment == "production":
            for name in ("signing_secret", "webhook_secret"):
                value = getattr(self, name).get_secret_value()
                if _placeholder(value) or len(value) < MIN_SECRET_CHARS:
                    message = f"SUPIR_{name.upper()} must be a real secret of at least {MIN_SECRET_CHARS} characters"
                    raise ValueError(message + " in production (e.g. `openssl rand -base64 48`)")
            for name in ("s3_access_key_id", "s3_secret_access_key", "redis_password", "redis_sentinel_password"):
                value = getattr(self, name)
                text = value.get_secret_value() if isinstance(value, SecretStr) else value
                if text is not None and _placeholder(text):
                    raise ValueError(f"SUPIR_{name.upper()} is the example's placeholder: set the real value")
            if self.dev_mode:
                raise ValueError("SUPIR_DEV_MODE (no API keys) is not allowed in production")
        return self

    @property
    def visibility_timeout_s(self) -> int:
        return self.job_time_limit_s + self.visibility_margin_s


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
