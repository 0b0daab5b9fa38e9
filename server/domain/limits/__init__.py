"""Limits: rate limits (GCRA) and the limiter's decisions, monthly quotas and request
usage, and the log of refused calls."""
