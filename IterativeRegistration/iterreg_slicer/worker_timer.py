"""Drives a :class:`iterreg.worker_client.WorkerClient` from Slicer's event loop with a ``qt.QTimer``.

The timer calls ``poll`` every ``interval_ms``; poll never blocks (the client's reader threads did the
copying), so the GUI stays responsive however slow the worker is. The timer stops itself when the run ends.
"""
from __future__ import annotations

import qt

__all__ = ["WorkerTimer"]


class WorkerTimer:
    def __init__(self, client, interval_ms: int = 20):
        self.client = client
        self.timer = qt.QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)

    @property
    def active(self) -> bool:
        return self.timer.isActive()

    def start(self) -> None:
        """Start the worker (if not started yet) and begin polling."""
        if self.client.state == "idle":
            self.client.start()
        self.timer.start()

    def cancel(self) -> None:
        self.client.cancel()

    def _tick(self) -> None:
        try:
            running = self.client.poll()
        except Exception:
            self.timer.stop()  # the client already stopped the worker; let Slicer show the traceback
            raise
        if not running:
            self.timer.stop()
