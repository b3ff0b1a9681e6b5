"""Errors that become Proxmox-style HTTP answers."""


class ApiError(Exception):
    """An HTTP error with Proxmox's status and message; most failures inside a Proxmox handler are 500s."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status
        self.message = message


class TaskFailed(Exception):
    """Ends a worker task with this text as its exit status, as a `die` inside a Proxmox worker does."""
