"""mqlite: an embeddable, in-process message queue and pub/sub broker for Python."""

from mqlite.broker import DEAD_LETTER_CONFIG, Broker, dead_letter_queue_name
from mqlite.clock import Clock, ManualClock, SystemClock
from mqlite.config import Backoff, QueueConfig
from mqlite.dispatch import Dispatcher, ManualDispatcher, ThreadDispatcher
from mqlite.engine.codec import JsonSerializer, PickleSerializer, Serializer
from mqlite.errors import (
    AckModeError,
    BrokerClosed,
    ConfigConflict,
    InvalidArgument,
    InvalidName,
    MqliteError,
    NotPending,
    QueueFull,
    SerializationError,
    StorageError,
    SubscriptionClosed,
    TransactionConflict,
    TransactionError,
    WouldDeadlock,
    WrongEventLoop,
)
from mqlite.info import BrokerInfo, PendingMessage, QueueInfo, SubscriptionInfo
from mqlite.message import Message
from mqlite.pipeline import transform
from mqlite.queue import Queue
from mqlite.subscription import Subscription
from mqlite.transaction import Transaction

__all__ = [
    "DEAD_LETTER_CONFIG",
    "AckModeError",
    "Backoff",
    "Broker",
    "BrokerClosed",
    "BrokerInfo",
    "Clock",
    "ConfigConflict",
    "Dispatcher",
    "InvalidArgument",
    "InvalidName",
    "JsonSerializer",
    "ManualClock",
    "ManualDispatcher",
    "Message",
    "MqliteError",
    "NotPending",
    "PendingMessage",
    "PickleSerializer",
    "Queue",
    "QueueConfig",
    "QueueFull",
    "QueueInfo",
    "SerializationError",
    "Serializer",
    "StorageError",
    "Subscription",
    "SubscriptionClosed",
    "SubscriptionInfo",
    "SystemClock",
    "ThreadDispatcher",
    "Transaction",
    "TransactionConflict",
    "TransactionError",
    "WouldDeadlock",
    "WrongEventLoop",
    "dead_letter_queue_name",
    "transform",
]

__version__ = "0.1.0"
