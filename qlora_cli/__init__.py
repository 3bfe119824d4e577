"""The entry points, one floor above the others: the `qlora` command line (main.py), `qlora serve`
(serve.py: API + worker + inference server on one machine), the demo, and readiness probes.

They stand on `api`, `worker`, `inference` and `qlora_core`; `service` (settings, database, storage,
keys, queue) is the shared base beneath all of them and imports none of these.
"""
