"""Runnable examples of the whole job: `make demo` runs examples/demo.py."""
