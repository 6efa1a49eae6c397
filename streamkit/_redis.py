"""The ``redis`` extra's one import, for the modules that use redis-py.

``streamkit.hub.redis`` (RedisStorage) and ``streamkit.session.redis``
(RedisPeers) import redis-py only when one of their objects is made, through
:func:`import_redis`, so ``import streamkit`` never does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXTRA", "import_redis"]

#: The extra that installs redis-py.
EXTRA = "streamkit[redis]"


def import_redis(user: str) -> Any:
    """The ``redis`` package (with ``asyncio``, ``backoff``, ``exceptions`` loaded).

    Without redis-py, raises ``ImportError`` saying that ``user`` (say,
    ``"RedisStorage"``) needs it and naming the extra to install.
    """
    try:
        import redis
        import redis.asyncio
        import redis.backoff
        import redis.exceptions
    except ImportError as exc:
        raise ImportError(
            f'{user} needs redis-py: pip install "{EXTRA}" (importing it failed: {exc})',
            name=exc.name,
        ) from exc
    return redis
