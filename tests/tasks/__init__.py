"""Tests of the xmoe_mlm_tlm task.

A package, so that pytest imports this folder's conftest as `tasks.conftest` and does not put
this folder on sys.path, where its conftest would shadow tests/conftest.py for `from conftest import`.
"""
