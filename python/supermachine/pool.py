"""Warm pools: VMs restored from a snapshot ahead of time and handed out in milliseconds.

::

    image = Image.from_snapshot(store / "warm")
    with image.pool(min=2, max=8) as pool:
        with pool.vm() as vm:                 # an idle VM, restored and answering already
            vm.exec(["echo", "hi"])
        # leaving the block stops that VM; the pool restores a fresh one in its place

A background thread keeps ``min`` VMs restored and idle. :meth:`Pool.acquire` hands out one of
them at once; when none is idle it restores one for the caller if fewer than ``max`` VMs exist,
else waits for a release. A released VM is stopped, not reused, unless the caller says otherwise:
each user gets a fresh clone of the snapshot, so nothing one user did (files, processes, guest
random state) reaches the next.

Pools only restore snapshots; a pool of an OCI image raises :class:`PoolError`. Booting would make
every refill a cold boot, which is what a pool exists to avoid: boot once, ``vm.snapshot(dir)``,
and pool ``Image.from_snapshot(dir)``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from supermachine.errors import PoolError, SupermachineError
from supermachine.vm import Vm
from supermachine.worker import VmmMode

if TYPE_CHECKING:
    from supermachine.image import Image

log = logging.getLogger(__name__)

__all__ = ["Pool", "PoolError", "PoolStats"]

_RETRY_FIRST = 0.5
"""Seconds the refill waits after a failed restore; doubled after each further failure."""
_RETRY_MAX = 30.0
_SWEEP_SECONDS = 2.0
"""How often idle VMs are checked for having died (they are checked again when handed out)."""


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's state and counters since it was created."""

    idle: int
    """VMs restored and waiting to be acquired."""
    in_use: int
    """VMs acquired and not released yet."""
    starting: int
    """Restores under way (by the refill thread or for an ``acquire`` call)."""
    restored: int
    failed: int
    """Restores that raised; the last error is in :attr:`last_error`."""
    discarded_dead: int
    """Idle VMs that were found ended (crashed, powered off, stopped) and thrown away."""
    hits: int
    """``acquire`` calls served at once by an idle VM."""
    misses: int
    """``acquire`` calls that waited for a restore or a release."""
    mean_restore_seconds: float | None
    """Mean time of a successful restore, until its agent answered (``None`` before the first)."""
    last_error: str | None
    """The last restore error, until a restore succeeds again."""


class Pool:
    """Restored VMs of one snapshot image, kept ready. Use :meth:`Image.pool
    <supermachine.image.Image.pool>`; close it with :meth:`close` or a ``with`` block.

    At most ``max`` VMs exist at any time (idle, in use, being restored or being stopped). All
    methods may be called from any thread.
    """

    def __init__(self, image: Image, min: int = 1, max: int = 4, *, vmm: VmmMode = "worker") -> None:
        if max < 1:
            raise ValueError(f"max must be at least 1, got {max}")
        if not 0 <= min <= max:
            raise ValueError(f"min must be between 0 and max ({max}), got {min}")
        if image.snapshot is None:
            raise PoolError(
                f"{image.ref} is not a snapshot image; a pool restores VMs from a snapshot: "
                "start a VM, vm.snapshot(dir), then Image.from_snapshot(dir).pool()"
            )
        self.image = image
        self.vmm = vmm
        self.min = min
        self.max = max
        self._cond = threading.Condition()
        self._idle: deque[Vm] = deque()
        self._in_use: set[Vm] = set()
        self._refilling = 0  # restores under way in the refill thread
        self._inline = 0  # restores under way in acquire() callers
        self._stopping = 0  # VMs being stopped: they hold their memory until stop() returns
        self._waiting = 0  # acquire() calls waiting for a VM
        self._closed = False
        self._restored = 0
        self._failed = 0
        self._restore_seconds = 0.0
        self._dead = 0
        self._hits = 0
        self._misses = 0
        self._last_error: str | None = None
        self._retry_at = 0.0
        self._backoff = _RETRY_FIRST
        # A daemon, so that a pool left open does not keep the interpreter from exiting.
        self._thread = threading.Thread(target=self._refill_loop, name="sm-pool-refill", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if self._closed else f"{s.idle} idle, {s.in_use} in use"
        return f"<Pool of {self.image.snapshot} min={self.min} max={self.max}: {state}>"

    # -- handing out --------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> Vm:
        """A running VM for the caller's exclusive use; give it back with :meth:`release`.

        An idle VM is returned at once. Otherwise, if fewer than ``max`` VMs exist, one is restored
        for this call (a restore already under way for the idle set is waited for instead);
        else the call waits for a release. ``timeout`` bounds that wait, not a restore started for
        this call. Raises :class:`PoolError` when the pool is closed, when ``timeout`` passes, or
        with the restore error when the restores fail.
        """
        vm = self._take(timeout)
        return vm if vm is not None else self._restore_inline()

    def release(self, vm: Vm, reuse: bool = False) -> None:
        """Gives ``vm`` back. By default it is stopped and the refill restores a fresh VM in its
        place, so no state reaches the next user. ``reuse=True`` puts it back into the idle set
        as it is (files, processes and all), for callers who trust its users; a VM that ended is
        never reused."""
        with self._cond:
            if vm not in self._in_use:
                if self._closed:
                    return  # close() stopped it already
                raise PoolError("this VM is not in use from this pool (released twice, or not acquired here)")
            self._in_use.remove(vm)
            if reuse and not self._closed and vm.outcome is None:
                self._idle.append(vm)
                self._cond.notify_all()
                return
            self._stopping += 1
        self._discard([vm])

    @contextmanager
    def vm(self, timeout: float | None = None, *, reuse: bool = False) -> Iterator[Vm]:
        """``with pool.vm() as vm:`` acquires a VM and releases it when the block ends (never
        reused if the block raised)."""
        machine = self.acquire(timeout)
        try:
            yield machine
        except BaseException:
            self.release(machine)
            raise
        self.release(machine, reuse=reuse)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Blocks until ``min`` VMs are idle (or as many as the VMs in use leave room for under
        ``max``). Raises :class:`PoolError` if a restore fails meanwhile or ``timeout`` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            failures = self._failed
            while len(self._idle) < min(self.min, self.max - len(self._in_use)):
                self._raise_if_closed()
                if self._failed != failures:
                    raise PoolError(f"the pool cannot restore VMs: {self._last_error}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolError(
                        f"the pool did not warm up within {timeout:g} s "
                        f"({len(self._idle)} of {self.min} VMs idle)"
                    )
                self._cond.wait(remaining)

    def stats(self) -> PoolStats:
        with self._cond:
            return PoolStats(
                idle=len(self._idle),
                in_use=len(self._in_use),
                starting=self._refilling + self._inline,
                restored=self._restored,
                failed=self._failed,
                discarded_dead=self._dead,
                hits=self._hits,
                misses=self._misses,
                mean_restore_seconds=self._restore_seconds / self._restored if self._restored else None,
                last_error=self._last_error,
            )

    # -- shutting down ------------------------------------------------------------------------

    def close(self) -> None:
        """Stops every VM of the pool, idle and in use, and the refill thread; returns once all
        of them are stopped (a restore under way is finished first, then stopped). Idempotent."""
        with self._cond:
            self._closed = True
            doomed = [*self._idle, *self._in_use]
            self._idle.clear()
            self._in_use.clear()
            self._stopping += len(doomed)
            self._cond.notify_all()
        self._discard(doomed)
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._cond:
            while self._inline or self._refilling or self._stopping:
                self._cond.wait()

    def __enter__(self) -> Pool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _take(self, timeout: float | None) -> Vm | None:
        """An idle VM now in use, or ``None`` when the caller is to restore one (its slot is then
        reserved in ``_inline``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        with self._cond:
            failures = self._failed
            self._waiting += 1
            try:
                while True:
                    self._raise_if_closed()
                    vm = self._pop_idle_locked()
                    if vm is not None:
                        self._in_use.add(vm)
                        if waited:
                            self._misses += 1
                        else:
                            self._hits += 1
                        return vm
                    if self._failed != failures:
                        # A restore this call was waiting for failed: report it rather than
                        # retrying in a loop the caller cannot see.
                        raise PoolError(f"the pool cannot restore a VM: {self._last_error}")
                    # Restores under way for the idle set beyond those owed to earlier waiters
                    # will serve this call sooner than a restore of its own would.
                    if self._refilling <= self._waiting - 1 and self._alive_locked() < self.max:
                        self._inline += 1
                        self._misses += 1
                        return None
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise PoolError(self._timeout_message_locked(timeout))
                    waited = True
                    self._cond.wait(remaining)
            finally:
                self._waiting -= 1

    def _timeout_message_locked(self, timeout: float | None) -> str:
        message = (
            f"no VM became free within {timeout:g} s "
            f"({len(self._in_use)} in use of max {self.max}, {self._refilling + self._inline} restoring)"
        )
        if self._last_error is not None:
            message += f"; last restore error: {self._last_error}"
        return message

    def _restore_inline(self) -> Vm:
        try:
            vm = self._restore()
        except BaseException:
            with self._cond:
                self._inline -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._inline -= 1
            closed = self._closed
            if closed:
                self._stopping += 1
            else:
                self._in_use.add(vm)
            self._cond.notify_all()
        if closed:
            self._discard([vm])
            raise PoolError("the pool was closed while a VM was being restored for this call")
        return vm

    def _restore(self) -> Vm:
        """Restores one VM, outside the lock, and counts the result."""
        started = time.monotonic()
        try:
            vm = self.image.start(vmm=self.vmm)
        except Exception as exc:  # any failure, so that the refill thread survives it and reports it
            message = _one_line(exc)
            with self._cond:
                self._failed += 1
                self._last_error = message
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, _RETRY_MAX)
                self._cond.notify_all()
            log.warning("pool of %s: a restore failed: %s", self.image.snapshot, message)
            raise PoolError(f"the pool cannot restore a VM: {message}") from exc
        with self._cond:
            self._restored += 1
            self._restore_seconds += time.monotonic() - started
            self._last_error = None
            self._retry_at = 0.0
            self._backoff = _RETRY_FIRST
        return vm

    def _refill_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    self._sweep_dead_locked()
                    if self._refill_due_locked():
                        break
                    self._cond.wait(self._sleep_seconds_locked())
                self._refilling += 1
            self._refill_one()

    def _refill_one(self) -> None:
        vm: Vm | None = None
        # A failure is counted and kept as last_error for acquire() to raise; retried after a back-off.
        with suppress(PoolError):
            vm = self._restore()
        with self._cond:
            self._refilling -= 1
            if vm is not None:
                if self._closed:
                    self._stopping += 1
                else:
                    self._idle.append(vm)
                    vm = None
            self._cond.notify_all()
        if vm is not None:
            self._discard([vm])

    def _refill_due_locked(self) -> bool:
        return (
            len(self._idle) + self._refilling < self.min
            and self._alive_locked() < self.max
            and time.monotonic() >= self._retry_at
        )

    def _sleep_seconds_locked(self) -> float | None:
        """How long the refill thread may sleep before it has something to check by itself;
        ``None``: until notified."""
        waits = [_SWEEP_SECONDS] if self._idle else []
        backing_off = self._retry_at - time.monotonic()
        if backing_off > 0:
            waits.append(backing_off)
        return min(waits, default=None)

    def _alive_locked(self) -> int:
        return len(self._idle) + len(self._in_use) + self._refilling + self._inline + self._stopping

    def _pop_idle_locked(self) -> Vm | None:
        while self._idle:
            vm = self._idle.popleft()
            if vm.outcome is None:
                return vm
            self._drop_dead_locked(vm)
        return None

    def _sweep_dead_locked(self) -> None:
        for vm in [vm for vm in self._idle if vm.outcome is not None]:
            self._idle.remove(vm)
            self._drop_dead_locked(vm)

    def _drop_dead_locked(self, vm: Vm) -> None:
        # Stopping a VM whose vCPUs have already ended is quick, so it is done under the lock:
        # the slot is free as soon as the lock is released.
        log.info("pool of %s: discarding an idle VM that ended: %s", self.image.snapshot, vm.outcome)
        self._dead += 1
        vm.stop()
        self._cond.notify_all()

    def _discard(self, vms: list[Vm]) -> None:
        """Stops VMs already counted in ``_stopping``, outside the lock."""
        if not vms:
            return
        for vm in vms:
            try:
                vm.stop()
            except Exception as exc:  # the rest must still be stopped and the count kept right
                log.warning("pool of %s: cannot stop a VM: %s", self.image.snapshot, _one_line(exc))
        with self._cond:
            self._stopping -= len(vms)
            self._cond.notify_all()

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise PoolError("the pool is closed")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, SupermachineError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
