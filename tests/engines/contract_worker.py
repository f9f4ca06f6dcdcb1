"""The hub a worker process of the contract suite serves (`fh-tasks worker contract_worker:tasks`): built by the
engine named in the environment, with the tasks of `contract_tasks` registered."""
from engines_support import worker_hub

tasks = worker_hub()
