"""Shared plumbing: params.yaml loading and one-line CLI errors (config), atomic outputs, progress."""
