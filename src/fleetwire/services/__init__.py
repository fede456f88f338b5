"""The use cases over the seams (store, broker, presence, verifier) and the domain.

Nothing here knows HTTP, WebSocket or MQTT: REST routes and every transport call these.
"""
