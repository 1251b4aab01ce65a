"""Tests of export, hub loading, the tokenizer, fine-tuning heads and the fine-tuning recipe.

A package, so that pytest imports this folder's conftest as `export.conftest` and does not put
this folder on sys.path, where its conftest would shadow tests/conftest.py.
"""
