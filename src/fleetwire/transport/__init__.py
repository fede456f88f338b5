"""WebSocket transport: the seam the session layer sees and its adapters.

- `base`: the seam (`UpgradeRequest`, `Refusal`, `Socket`, `Handler`, `WebSocketApp`,
  `text_frame`, `TransportLimits`, `TransportAdapter`).
- `rfc6455`: RFC 6455 rules without I/O (frames, messages, close codes, UTF-8, closing handshake).
- `picows`: the adapter, picows behind uvicorn's `ws` hook.
- `server`: the one-port uvicorn server (REST + WebSocket).
- `logs`: access-token redaction for every log that sees a request target.
"""
