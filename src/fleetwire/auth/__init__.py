"""Who is calling: the TokenVerifier seam and the Principal it yields."""

from fleetwire.auth.principal import AuthError, Principal, Role, TokenVerifier, UnknownKeyError

__all__ = ["AuthError", "Principal", "Role", "TokenVerifier", "UnknownKeyError"]
