"""Background loops."""
