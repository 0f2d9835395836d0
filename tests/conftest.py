"""Shared pytest set-up.

This file's presence puts ``tests/`` on ``sys.path`` (pytest's default "prepend" import mode), so
test modules in sub-folders can ``from _shared import ...`` (real-data location, fixture
factories).
"""
