"""What the API and the workers share, and nothing that needs torch: settings, the job record and its
Redis store, object stores, webhook signing.

    api (FastAPI) ──> jobs <── worker (Celery) ──> supir_core
"""
