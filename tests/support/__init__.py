"""Shared test helpers: harnesses, relays, processes and vectors used by several test
modules (no test module imports another)."""
