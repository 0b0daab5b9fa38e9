"""Notifications: critical conditions told to operators' channels (webhook, email), and
users' own events told to them by email as their preferences allow; de-duplicated and
rate limited."""
