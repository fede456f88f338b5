"""MQTT (contract §8): the packet codec and the TCP listener; nothing of fleetwire."""
