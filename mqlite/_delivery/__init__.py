"""The delivery contract, written once as plain code: no threads, no locks, no I/O.

Entry states and their transitions (:mod:`.entries`), cursors and their positions
(:mod:`.cursor`), the redelivery schedule (:mod:`.schedule`), the failure decision and the
ack-mode rules (:mod:`.policy`), the retention floor (:mod:`.retention`) and the registry of
blocked readers (:mod:`.waiters`). Engines that decide in Python call these; an engine that
decides on a server (Redis scripts) implements the same rules and proves it with
``mqlite.testing.check_engine``.
"""
