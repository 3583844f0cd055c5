"""Catalog schema revisions, oldest first (an __init__ only so that setuptools installs them)."""
