"""Identity: users and their profiles, sign-in and sessions (``accounts``), access tokens,
API keys and what a credential may grant, authentication, roles and permissions, the
login throttle, and tiers with their limits (``tiers``)."""

#: Modules other aggregates may import besides model, ports and rules (see server.domain).
PUBLISHED = ("tiers",)
