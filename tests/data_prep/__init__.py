"""Tests of the data-prep scripts.

A package, so that pytest imports this folder's conftest as `data_prep.conftest` instead of
putting the folder on sys.path, where its conftest would shadow tests/conftest.py.
"""
