"""The Redis Streams engine: queues on a Redis 7 server, shared by every broker that opens the same URL.

``engine`` holds :class:`~mqlite.engine.redis.engine.RedisEngine` and its queues, ``scripts``
the Lua script of every operation, ``keys`` the key layout. Needs the ``mqlite[redis]`` extra.
"""
