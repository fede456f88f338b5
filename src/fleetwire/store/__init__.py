"""Durable state: the Store seam and its one SQL implementation (SQLite and PostgreSQL)."""
