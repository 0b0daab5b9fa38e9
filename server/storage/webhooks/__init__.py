"""Webhooks' repository: endpoints (secrets and headers sealed) and their delivery queue."""
