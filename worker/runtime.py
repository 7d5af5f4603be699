"""The worker's state: weights loaded once per process (after fork), stores, and a readiness heartbeat."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import redis

from jobs.estimates import RateBook
from jobs.redis_conn import store_client
from jobs.settings import Settings
from jobs.storage import ObjectStore, make_store
from jobs.store import JobStore
from jobs.usage import UsageBook
from supir_core.errors import SettingsError

from . import metrics

log = logging.getLogger("supir.worker")
State = Literal["loading", "ready", "failed"]
# any SDXL UNet (the base, a fine-tune) has 2,567,463,684 parameters; fewer than this is a test model
REAL_UNET_PARAMETERS = 1_000_000_000


class Runtime:
    def __init__(self, settings: Settings, store: JobStore | None = None, objects: ObjectStore | None = None) -> None:
        self.settings = settings
        client = store_client(settings, socket_timeout=30)
        self.store = store or JobStore(client, settings.key_prefix, retention_s=settings.retention_hours * 3600)
        self.objects = objects or make_store(settings)
        self.usage = UsageBook(self.store.r, self.store.p, settings.usage_retention_s)
        self.pipeline: Any = None  # the first served variant's (tests may set it alone)
        self.pipelines: dict[str, Any] = {}  # variant → its pipeline (the SDXL parts shared between them)
        self.models: dict[str, dict[str, Any]] = {}  # variant → {model_id, supir_sha256, sdxl_sha256, test_model…}
        self.variants: list[str] = settings.worker_variant_names
        self.state: State = "loading"
        self.failed_tries = 0  # loads of the weights that failed in this process
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # one per worker process; jobs record it
        # sends a job's `started` / `progress` webhook event (worker.tasks queues it for the light worker)
        self.announce: Callable[[str, str], None] = lambda job_id, event: None
        self.on_beat: Callable[[], None] = lambda: None  # worker.tasks: tells the main process (liveness)
        self.job: str | None = None  # the job this process runs, named in every beat
        self._stop = threading.Event()
        self._beat_now = threading.Event()
        self._compiles = {"graphs": 0, "eager_fallbacks": 0}  # torch.compile's counts at the last look

    def load(self) -> None:
        """Weights → device, in up to `worker_load_tries` tries with a doubling back-off between them (a file still
        being copied, a transient read error). Ends `ready`, or `failed` once the tries are spent or another could
        not finish within `worker_load_timeout_s` (Celery would kill this process mid-try, and its replacement would
        begin again: never-ending). Each failed try is counted in Redis (the alert's signal)."""
        s = self.settings
        if s.ready_file is not None:
            s.ready_file.unlink(missing_ok=True)  # a previous process's file must not vouch for this one
        threading.Thread(target=self._beat, name="supir-heartbeat", daemon=True).start()
        deadline = time.monotonic() + s.worker_load_timeout_s
        backoff = s.worker_load_backoff_s
        for attempt in range(1, s.worker_load_tries + 1):
            start = time.monotonic()
            try:
                self._load_once()
            except SettingsError as exc:  # no try can mend settings that cannot work together
                log.error("refused: %s", exc.message)
                self.failed_tries = attempt
                self._count_load_failure()
                break
            except Exception:
                log.exception("loading the weights failed (try %d of %d)", attempt, s.worker_load_tries)
                self.pipelines, self.pipeline = {}, None  # nothing of a failed try is kept (GPU memory)
                self.failed_tries = attempt
                self._count_load_failure()
                next_end = time.monotonic() + backoff + (time.monotonic() - start)
                if attempt == s.worker_load_tries or next_end > deadline or self._stop.is_set():
                    break
                log.warning("trying again in %.0f s", backoff)
                self._stop.wait(backoff)
                backoff *= 2
                continue
            self._loaded(time.monotonic() - start)
            return
        self.state = "failed"
        metrics.READY.set(0)
        self._beat_now.set()
        log.error("the weights failed to load %d times; this worker will not take jobs", attempt)

    def _load_once(self) -> None:
        """One try. Imported here so that nothing torch-related runs before the fork."""
        from supir_core.checkpoints import ModelOptions, load_model_options

        s = self.settings
        files = {name: s.variant_files[name] for name in self.variants}
        missing = [name for name, path in files.items() if path is None]
        if s.sdxl_checkpoint is None or missing:
            raise RuntimeError("set SUPIR_SDXL_CHECKPOINT and SUPIR_CHECKPOINT (or SUPIR_VARIANTS)")
        options = load_model_options(s.model_config_file) if s.model_config_file else ModelOptions()
        from supir_core.speed import SpeedSettings
        from supir_core.variants import load_variants

        speed = SpeedSettings.from_attributes(s)
        speed.check(_device(s.device))  # before minutes of loading
        paths = {name: Path(str(path)) for name, path in files.items()}
        self.pipelines = load_variants(
            s.sdxl_checkpoint, paths, device=s.device, dtype=_dtype(s.dtype), options=options, speed=speed
        )
        self.pipeline = self.pipelines[self.variants[0]]
        captioner = self._captioner(str(self.pipeline.device))
        for pipeline in self.pipelines.values():
            pipeline.captioner = captioner  # one LLaVA for every variant
        self._identify(s.sdxl_checkpoint, paths)
        if s.warmup_size:
            seconds = self.pipeline.warm_up(s.warmup_size)
            metrics.WARMUP_SECONDS.set(seconds)
            log.info("warm-up restoration at %d² took %.1f s", s.warmup_size, seconds)
            self.count_compiles("the warm-up")
        for name in self.variants:
            self.publish_plan(name)

    def count_compiles(self, what: str) -> None:
        """Graphs torch.compile built during `what` (a job, the warm-up) into metrics and the log; a function that
        hit the recompile limit (it runs eager from now on, slowly) is a warning."""
        if self.settings.compile == "none":
            return
        from supir_core.speed import compile_counts

        now = compile_counts()
        graphs, fallbacks = (now[k] - self._compiles[k] for k in ("graphs", "eager_fallbacks"))
        self._compiles = now
        if graphs > 0:
            metrics.COMPILED_GRAPHS.inc(graphs)
            log.info("%s compiled %d graphs (%d in this process)", what, graphs, now["graphs"])
        if fallbacks > 0:
            metrics.COMPILE_FALLBACKS.inc(fallbacks)
            log.warning(
                "%s: %d compiled functions hit the recompile limit and run eager from now on; sizes vary more than "
                "the compile cache holds (SUPIR_COMPILE_DYNAMIC=1: one graph serves every size)",
                what,
                fallbacks,
            )

    def _loaded(self, seconds: float) -> None:
        metrics.MODEL_LOAD_SECONDS.set(seconds)
        metrics.READY.set(1)
        self.state = "ready"
        self._beat_now.set()
        if self.settings.ready_file is not None:
            # names this process by pid and start time: `python -m worker.health` checks that it still lives
            from .health import ready_file_text

            self.settings.ready_file.write_text(ready_file_text(os.getpid()))
        log.info("weights loaded in %.1f s on %s", seconds, self.pipeline.device)

    def _count_load_failure(self) -> None:
        try:
            self.store.count_load_failure(self.variants)
        except redis.RedisError:
            log.warning("could not count the failed load in Redis")

    def pipeline_for(self, variant: str) -> Any:
        """The pipeline of a job's variant; None when this worker does not serve it."""
        if not self.pipelines:
            return self.pipeline
        return self.pipelines.get(variant or self.variants[0])

    def _identify(self, sdxl: Path, supir: dict[str, Path]) -> None:
        """Hash the files (once per cluster: the hashes are kept in Redis by path, size and mtime) and publish
        each variant's model identity, which jobs record and the API keys its result cache on."""
        from supir_core.variants import model_identity

        sdxl_sha256 = self._file_sha256(sdxl)
        # the size of what was loaded says whether it is the real model: the SDXL UNet has 2.57 B parameters, the
        # tiny test model (random weights, tests/data/conformance) far fewer; the API and the page tell people
        unet = sum(p.numel() for p in self.pipeline.model.unet.parameters())
        for name, path in supir.items():
            supir_sha256 = self._file_sha256(path)
            info = {
                "model_id": model_identity(sdxl_sha256, supir_sha256),
                # device type, dtype, fp8: a seed's result differs between them (the result cache keys on it)
                "numerics": self.pipeline_for(name).numerics,
                "supir_sha256": supir_sha256,
                "sdxl_sha256": sdxl_sha256,
                "unet_parameters": unet,
                "test_model": unet < REAL_UNET_PARAMETERS,
            }
            self.models[name] = info
            self.store.publish_variant(name, info)

    def publish_plan(self, variant: str) -> None:
        """The variant's memory plan (traced bytes per pixel, budget) into Redis: the API's estimates tell from it
        which parts of a job would tile."""
        pipeline = self.pipeline_for(variant)
        if pipeline is None or not hasattr(pipeline, "memory_plan"):  # a stand-in pipeline (tests)
            return
        stage_bytes, budget = pipeline.memory_plan()
        RateBook(self.store).publish_plan(variant, stage_bytes, budget, self.name)

    def _file_sha256(self, path: Path) -> str:
        from supir_core.weights import sha256_of

        stat = path.stat()
        where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()
        known = self.store.file_hash(where)
        if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
            return str(known["sha256"])
        digest = sha256_of(path)
        self.store.remember_file_hash(where, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest})
        return digest

    def _captioner(self, device: str) -> Any:
        s = self.settings
        if not s.llava_model:
            return None
        from supir_core.captioning import CaptionSettings, LlavaCaptioner

        settings = CaptionSettings(
            temperature=s.llava_temperature,
            top_p=s.llava_top_p,
            max_new_tokens=s.llava_max_new_tokens,
            pad_to_square=s.llava_pad_to_square,
        )
        captioner = LlavaCaptioner(
            s.llava_model,
            device=s.llava_device or device,
            dtype=_dtype(s.llava_dtype),
            quantization=s.llava_quantization,
            keep_loaded=s.llava_keep_loaded,
            offload=s.llava_offload,
            settings=settings,
        )
        if s.llava_keep_loaded:
            captioner.load()  # at start, not in the first job
        return captioner

    def running(self, job: str | None) -> None:
        """Name the job this process runs (None when it ends) in a beat at once."""
        self.job = job
        self.beat()

    def beat(self) -> None:
        ttl = self.settings.worker_lost_after_s
        self.store.heartbeat(self.name, self.state, self.job, ttl_s=ttl, variants=self.variants)

    def _beat(self) -> None:
        every = self.settings.worker_lost_after_s / 4
        while not self._stop.is_set():
            self.on_beat()  # before Redis: liveness is about this process, not about Redis
            try:
                self.beat()
            except redis.RedisError:
                log.warning("heartbeat to Redis failed")
            self._beat_now.wait(every)
            self._beat_now.clear()

    def stop(self) -> None:
        self._stop.set()
        self._beat_now.set()
        if self.settings.ready_file is not None:
            self.settings.ready_file.unlink(missing_ok=True)
        with contextlib.suppress(redis.RedisError):
            self.store.drop_heartbeat(self.name)


def _device(name: str | None) -> Any:
    import torch

    from supir_core.pipeline import default_device

    return torch.device(name or default_device())


def _dtype(name: str | None) -> Any:
    import torch

    from supir_core.params import dtype_name

    return getattr(torch, dtype_name(name)) if name else None
