"""Identity's repositories: users and avatars, sessions and refresh tokens, API keys."""
