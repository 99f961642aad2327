"""The pie-trio client library (trio): connect, authenticate, upload, launch, stream events."""

from pie_trio.client.client import Client, Event, RemoteInstance, ServerError, connect
from pie_trio.client.transport import ConnectionClosed

__all__ = ["Client", "ConnectionClosed", "Event", "RemoteInstance", "ServerError", "connect"]
