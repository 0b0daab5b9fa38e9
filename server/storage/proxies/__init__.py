"""Proxies in SQL: the resources, their config revisions and scaling events."""
