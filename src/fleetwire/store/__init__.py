"""Durable state: the Store seam (base), MemoryStore (memory) and SqlStore on SQLite or PostgreSQL (sql/)."""
