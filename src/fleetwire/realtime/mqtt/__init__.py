"""MQTT device sessions (contract §8): the sans-I/O core and its endpoint."""
