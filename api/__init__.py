"""The HTTP API: OpenAI's fine-tuning API, wire-compatible, plus adapter downloads.

Routes validate, record and enqueue; they never import torch (CONTRACT.md "Layout").
"""
