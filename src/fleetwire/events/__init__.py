"""Events after the commit: the publisher (outbox to the Broker) and the hub (to local subscribers)."""
