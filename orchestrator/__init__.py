"""The task flow, the queue and its worker, the Python API and the CLI."""
