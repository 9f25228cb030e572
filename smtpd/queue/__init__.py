"""The queue: the durable spool of messages and envelopes (docs/queue.md).

``build(daemon)`` sets ``daemon.queue`` (a ``Queue``): ``new_message()`` returns an ``IncomingMessage`` with
``write``/``add_envelope``/``commit``/``abort`` as the contract describes.
"""

from smtpd.queue.store import IncomingMessage, Queue, QueueError, build

__all__ = ["IncomingMessage", "Queue", "QueueError", "build"]
