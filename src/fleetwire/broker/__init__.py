"""Moving events and node-to-node messages: the Broker seam, memory:// and redis://."""
