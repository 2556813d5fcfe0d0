"""Model integrations (optional dependencies, imported on use)."""
