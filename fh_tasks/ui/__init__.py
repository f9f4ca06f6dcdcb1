"""FT components and routes that show jobs live."""
from .status import JobStatus, status_routes

__all__ = ["JobStatus", "status_routes"]
