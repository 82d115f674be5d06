"""The durable engine: one SQLite file (WAL mode) holds every queue, message and named cursor.

``schema`` lays the file out and checks it on open, ``sharing`` lets several brokers use one
file, ``writer`` turns writes into few statements and runs the batched writer, ``store`` holds
:class:`~mqlite.engine.sqlite.store.SqliteStore`, the open file, and ``log`` each queue's
:class:`~mqlite.engine.sqlite.log.SqliteLog` over it.
"""
