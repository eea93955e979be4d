"""relayd: a durable local SMTP relay."""

__version__ = "0.1.0"
