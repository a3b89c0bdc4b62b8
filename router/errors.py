"""The error tree. Lower libraries' errors are translated at the boundary.

RouterError
 ├── ConfigError          a config problem, with FILE: key.path: what
 ├── StoreError           the store is unreachable or refused a write
 ├── NotFound             an id, ref or name that does not exist
 ├── Conflict             a name that exists already, a lost race
 ├── BadInbound           input a channel rejects (status + field)
 └── DeliveryFailure      sending one outbound message failed
      ├── TemporaryFailure(retry_after_s)   retry with backoff
      └── PermanentFailure(reason)          no retry
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of everything support-router raises on purpose."""


class ConfigError(RouterError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StoreError(RouterError):
    pass


class NotFound(RouterError):
    pass


class Conflict(RouterError):
    pass


class BadInbound(RouterError):
    """Ingress rejected a request; `status` and `code` become the HTTP answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class DeliveryFailure(RouterError):
    pass


class TemporaryFailure(DeliveryFailure):
    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class PermanentFailure(DeliveryFailure):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
