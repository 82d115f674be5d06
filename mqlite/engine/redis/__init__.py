"""The Redis Streams engine: queues on a Redis 7 server, shared by every broker that opens the same URL.

``engine`` holds :class:`~mqlite.engine.redis.engine.RedisEngine` (opening the server, running
the scripts); ``connection`` calls the scripts, ``watcher`` keeps a broker alive and notices
other brokers' changes; ``queue`` is a queue's publishing, settings and introspection side and
``consuming`` its consumers' side; ``scripts`` holds the Lua script of every operation, ``wire``
the conversions between mqlite values and script arguments and replies, ``keys`` the key layout.
Needs the ``mqlite[redis]`` extra.
"""
