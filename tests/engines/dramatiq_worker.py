"""The hub worker processes of the Dramatiq engine's own tests serve (`fh-tasks worker dramatiq_worker:tasks`, or
Dramatiq's CLI: `dramatiq dramatiq_worker`): the contract hub plus `dramatiq_tasks`."""
import dramatiq_tasks
from engines_support import worker_hub

tasks = worker_hub()
dramatiq_tasks.register(tasks)
