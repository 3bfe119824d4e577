"""Pieces shared by the API and the workers: settings, database models, artifact store, CLI.

Nothing here imports torch at module level; the CLI imports `qlora_core` lazily for the
commands that train or inspect models.
"""
