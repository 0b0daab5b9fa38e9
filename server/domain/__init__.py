"""Business rules per area. Imports neither grpc nor sqlalchemy."""
