"""GPU workers: a thin Celery adapter from jobs to supir_core's RestorationPipeline."""
