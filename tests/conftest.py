"""Test-wide settings: hypothesis without per-example deadlines (a first torch call can take a while on a loaded
CI machine, and a deadline failure there says nothing about the code)."""

from hypothesis import settings

settings.register_profile("dsv4", deadline=None, derandomize=True)
settings.load_profile("dsv4")
