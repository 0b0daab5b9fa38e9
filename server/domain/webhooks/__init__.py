"""Webhooks: endpoints (drafts, custom headers, reachability), secrets and Standard Webhooks
signing, payloads and transformations, the outbox, what the dispatcher decides for each
delivery, and replays."""

#: Modules other aggregates may import besides model, ports and rules (see server.domain).
PUBLISHED = ("outbox",)
