"""FT components and routes that show jobs live: `JobStatus`, and the page containers that push it (`JobEvents` over
Server-Sent Events, `JobSocket` over a websocket), with `Notifications` for the end-of-job notices."""
from .live import JobEvents, JobSocket
from .notify import Notifications, verify_signature
from .status import JobStatus, status_routes

__all__ = ["JobStatus", "JobEvents", "JobSocket", "Notifications", "verify_signature", "status_routes"]
