"""The inference server: OpenAI's completion endpoints for base models and their LoRA adapters.

A peer of the worker (STYLE.md "The shape of the house"): the API stays torch-free and proxies to it.
"""
