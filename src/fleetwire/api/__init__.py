"""The REST API (contract §3): routes, their dependencies and problem documents."""
