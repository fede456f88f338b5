"""Real-time sessions: wire protocol, connections, the hub, the transport adapter."""
