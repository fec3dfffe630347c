"""Deployment back-ends: build a model for a runtime and run it."""
