"""Public ops: validation, backend dispatch and op registration, one module per op."""
