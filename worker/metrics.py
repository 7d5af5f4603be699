"""Worker metrics, served by each worker process on SUPIR_WORKER_METRICS_PORT (one process per GPU)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 1800)

JOBS_FINISHED = Counter("supir_jobs_finished_total", "jobs that reached a terminal status", ["status", "code"])
STAGE_SECONDS = Histogram("supir_stage_duration_seconds", "time per job stage", ["stage"], buckets=STAGE_BUCKETS)
STEPS_PER_SECOND = Gauge("supir_sampler_steps_per_second", "sampler steps per second of the last job")
MODEL_LOAD_SECONDS = Gauge("supir_model_load_seconds", "seconds the worker took to load the weights")
WARMUP_SECONDS = Gauge("supir_worker_warmup_seconds", "seconds of the warm-up restoration before taking jobs")
GPU_MEMORY_BYTES = Gauge("supir_gpu_memory_bytes", "GPU memory", ["kind"])
WEBHOOKS = Counter("supir_webhook_deliveries_total", "webhook delivery attempts", ["event", "outcome"])
GPU_SECONDS = Counter("supir_gpu_seconds_total", "pipeline seconds of succeeded jobs (usage)", ["variant"])
IMAGES = Counter("supir_images_restored_total", "results delivered by succeeded jobs (samples)", ["variant"])
COMPILED_GRAPHS = Counter("supir_compiled_graphs_total", "graphs torch.compile built (first compiles and recompiles)")
COMPILE_FALLBACKS = Counter(
    "supir_compile_eager_fallbacks_total", "compiled functions that hit the recompile limit and run eager since"
)
READY = Gauge("supir_worker_ready", "1 when the weights are loaded on the device")
POD_MARKS = Counter("supir_pod_marks_total", "patches of this pod's marks (worker.podmarks)", ["state", "outcome"])

# Series that alerts watch with increase(): made at 0 up front, so the first such event is an increase from 0
# (a series born at 1 shows no increase)
JOBS_FINISHED.labels("failed", "gpu_out_of_memory")
JOBS_FINISHED.labels("failed", "worker_lost")
WEBHOOKS.labels("completed", "failed")
POD_MARKS.labels("busy", "failed")
POD_MARKS.labels("idle", "failed")
