"""Puts this folder on ``sys.path`` (pytest imports a conftest from its own folder), so the test
modules of the subfolders import the shared helpers of ``tiny_steps.py``."""
