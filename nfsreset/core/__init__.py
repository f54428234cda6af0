"""The pure core: plain Python over plain data (which sessions are stale, which
actions, in which order). Imports nothing outside the core; tests/unit/test_layering.py holds that."""
