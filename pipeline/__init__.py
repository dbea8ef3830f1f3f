"""Orchestration: config, datasets, artifact store, stage DAG, Prefect flow, CLI, scoring.

Kept import-light: worker processes unpickle dataset readers from here without loading
Prefect.
"""
