"""Benchmarks: fh-tasks side by side with Starlette, huey, Celery, Dramatiq, RQ and arq (`make bench`)."""
