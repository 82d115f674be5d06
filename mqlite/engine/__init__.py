"""Engines: where queues store their messages, cursors and pending entries.

``memory_log`` keeps a log in a Python list; ``sqlite/`` keeps every queue of a broker in one
SQLite file, with a memory log as the cache; ``codec`` turns messages into stored rows and back,
for every engine that stores bytes. Concrete engines are imported where they are used, never
from here.
"""
