"""Training stages: one runnable module per stage (python -m training.<stage>)."""
