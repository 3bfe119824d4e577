"""The shared base the API, the workers and the inference server stand on: settings, database
models and engine, the artifact store, API keys, the Celery queue, and child-process lifetime.

It imports none of `api`, `worker`, `inference`, `qlora_core` or `qlora_cli` (the entry points,
one floor above), and nothing here imports torch.
"""
