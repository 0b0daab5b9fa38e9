"""SQLAlchemy models, repositories, the unit of work, replica routing, shared state."""
