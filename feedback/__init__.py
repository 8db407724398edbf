"""Feedback layer: tables, sessions, repository functions, dataset export/import.

Imports SQLAlchemy only: never gradio, never torch.
"""
