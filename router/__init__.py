"""kvroute's engine-agnostic routing core and its Ray Serve adapter.

Importing this package never imports Ray or vLLM; only ``router.serve`` does.
"""
