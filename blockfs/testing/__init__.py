"""Test kits for blockfs (user-mode Linux guests with the NBD driver: :mod:`blockfs.testing.uml`)."""
