"""The worker: a Celery app whose one task trains a job, with the job's state kept in the database.

`worker.app` builds the Celery app (from `service.queue`), whose worker imports `worker.tasks`;
`worker.main.run_worker` starts it with the reconciler beside it. Nothing here imports torch at
module level: the worker's parent process must never touch CUDA (children are forked from it).
"""
