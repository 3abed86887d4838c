"""Shared pytest options: ``--regen-golden`` rewrites pinned golden values instead of checking them."""
from __future__ import annotations


def pytest_addoption(parser):
    parser.addoption("--regen-golden", action="store_true", default=False,
                     help="rewrite tests/golden/*.json from the current code instead of checking")
