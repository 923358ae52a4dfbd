"""Evaluation entry points: ``forgetting_curve``, ``passkey`` and ``scrolls`` (see docs/evaluation.md)."""
