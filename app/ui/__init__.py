"""Gradio Blocks, one module per tab. ``build_demo(service)`` assembles them."""
