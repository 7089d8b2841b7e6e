"""The cleanup queue: every request returns a :class:`CleanupHandle` (a
:class:`concurrent.futures.Future`) at once; one worker thread takes
everything queued and runs it as a single table walk
(``Conntrack.delete_each``), however many requests and zones, then gives
each handle its own :class:`DeleteResult` (or the pass's exception, with
errno). The worker never dies on an error.

Counting: an entry matched by several queued requests is deleted once and
counted once, for the earliest-queued request that asked for it, so the
handles' ``deleted`` add up to what left the table.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno as _errno
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import ConntrackError
from .filter import Filter
from .rules import _unique
from .types import DeleteResult

if TYPE_CHECKING:
    import asyncio

LOG = logging.getLogger(__name__)

ReleaseKeys = Sequence[Tuple[str, int]]


class CleanupHandle(concurrent.futures.Future):
    """A queued cleanup: a :class:`concurrent.futures.Future` of its
    :class:`DeleteResult`. ``result(timeout)`` (alias ``wait``) returns it or
    raises the error of the pass that ran it (a ConntrackError with
    ``errno``), or TimeoutError; ``exception()``, ``done()`` and
    ``add_done_callback(fn)`` (``fn(handle)``, run in the worker thread: keep
    it quick) are the Future's. ``await handle`` (or ``wait_async()``) does
    the same without blocking an event loop (``asyncio.wrap_future``).

    A queued cleanup always runs: ``cancel()`` returns False, so cancelling
    a task that awaits the handle leaves the cleanup alone."""

    def __init__(self, description: str, filters: Sequence[Filter]) -> None:
        super().__init__()
        self.description = description
        self.filters: Tuple[Filter, ...] = tuple(filters)
        self._on_complete: List[Callable[[], None]] = []  # queue bookkeeping, before waiters

    def __repr__(self) -> str:
        if not self.done():
            state = "pending"
        else:
            exc = self.exception(0)
            state = f"failed: {exc}" if exc is not None else f"deleted {self.result(0).deleted}"
        return f"<CleanupHandle {self.description} ({len(self.filters)} filters) {state}>"

    def _timed_out(self, timeout: Optional[float]) -> TimeoutError:
        return TimeoutError(f"cleanup not done after {timeout} s: {self.description}")

    def result(self, timeout: Optional[float] = None) -> DeleteResult:
        """The DeleteResult; raises the pass's exception, or TimeoutError."""
        try:
            return super().result(timeout)
        except concurrent.futures.TimeoutError as exc:
            if self.done() and self.exception(0) is exc:  # the pass's own error
                raise
            raise self._timed_out(timeout) from None

    def wait(self, timeout: Optional[float] = None) -> DeleteResult:
        """Same as :meth:`result`."""
        return self.result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The pass's exception (None if it succeeded), or TimeoutError."""
        try:
            return super().exception(timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(timeout) from None

    def cancel(self) -> bool:
        return False

    def _finish(self, result: Optional[DeleteResult], exc: Optional[BaseException]) -> None:
        # called once, by the one thread that owns the request (the worker,
        # or the submitter before the handle is published)
        if self.done():
            return
        hooks, self._on_complete = self._on_complete, []
        for hook in hooks:
            try:
                hook()
            except Exception:
                LOG.exception("conntrack cleanup queue bookkeeping failed")
        if exc is not None:
            self.set_exception(exc)
        else:
            self.set_result(result)

    def wait_async(self) -> "asyncio.Future[DeleteResult]":
        """An asyncio future of the running loop (``asyncio.wrap_future``)."""
        import asyncio  # only for asyncio callers: not at import
        return asyncio.wrap_future(self, loop=asyncio.get_running_loop())

    def __await__(self):
        return self.wait_async().__await__()


class _Request:
    __slots__ = ("handle", "release_keys")

    def __init__(self, handle: CleanupHandle, release_keys: ReleaseKeys = ()):
        self.handle = handle
        self.release_keys = tuple(release_keys)


def _empty_result(reason: str) -> DeleteResult:
    return DeleteResult(0, 0, 0, 0, 0, "none", 0, 0.0, reason)


def _as_error(exc: BaseException) -> ConntrackError:
    if isinstance(exc, ConntrackError):
        return exc
    err = ConntrackError(f"conntrack cleanup pass failed: {exc!r}",
                         getattr(exc, "errno", None), "ConntrackManager pass")
    err.__cause__ = exc
    return err


class CleanupQueue:
    """Queued, coalesced cleanups run by one worker thread on ``conntrack``
    (an object with ``delete_each``). ``release(pairs)`` is called with a
    request's ``(key, zone)`` pairs once it has run (or failed).
    ``max_filters_per_pass``: a pass never splits a request, but starts a new
    walk past this many filters."""

    def __init__(self, conntrack: Any, max_filters_per_pass: int = 4096,
                 release: Optional[Callable[[ReleaseKeys], None]] = None,
                 name: str = "pyconntrack-manager") -> None:
        self._ct = conntrack
        self.max_filters_per_pass = max_filters_per_pass
        self._release_fn = release
        self._cond = threading.Condition()
        self._queue: List[_Request] = []
        self._pending: Dict[int, CleanupHandle] = {}
        self._holds = 0
        self._closing = False
        self.walks = 0              # table walks done by the worker
        self.passes = 0             # delete_each calls (successful or not)
        self.failed_passes = 0
        self.requests_done = 0
        self.thread = threading.Thread(target=self._worker, name=name, daemon=True)
        self.thread.start()

    # -- callers ---------------------------------------------------------------------
    def submit(self, description: str, filters: List[Filter], skipped: List[str],
               release_keys: ReleaseKeys = ()) -> CleanupHandle:
        """Queue ``filters`` (already validated); a handle at once. Nothing to
        delete: the handle is done already (``skipped``: devices without zone)."""
        filters = _unique(filters)
        handle = CleanupHandle(description, filters)
        request = _Request(handle, release_keys)
        with self._cond:
            if self._closing:
                raise ConntrackError("ConntrackManager is closed")
        if not filters:
            why = f"no zone for {', '.join(skipped)}" if skipped else "no matching device address"
            self._release(request)
            handle._finish(_empty_result(f"nothing to delete: {why}"), None)
            return handle
        with self._cond:
            if self._closing:
                raise ConntrackError("ConntrackManager is closed")
            self._pending[id(handle)] = handle
            handle._on_complete.append(lambda: self._forget(handle))
            self._queue.append(request)
            self._cond.notify_all()
        return handle

    def _forget(self, handle: CleanupHandle) -> None:
        with self._cond:
            self._pending.pop(id(handle), None)
            self.requests_done += 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Queue without running until the block ends."""
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def _snapshot(self) -> List[CleanupHandle]:
        with self._cond:
            return list(self._pending.values())

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for every cleanup queued so far; False if ``timeout`` passed first."""
        handles = self._snapshot()
        if not handles:
            return True
        _done, not_done = concurrent.futures.wait(handles, timeout)
        return not not_done

    async def wait_async(self) -> None:
        """Await every cleanup queued so far (errors stay on the handles)."""
        import asyncio
        handles = self._snapshot()
        if handles:
            await asyncio.gather(*(h.wait_async() for h in handles), return_exceptions=True)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def stats(self) -> dict:
        with self._cond:
            return {"walks": self.walks, "passes": self.passes,
                    "failed_passes": self.failed_passes, "requests_done": self.requests_done,
                    "pending": len(self._pending)}

    def close(self, timeout: Optional[float] = None) -> bool:
        """Stop taking requests, run what is queued, stop the worker; False if
        it was still busy after ``timeout`` seconds."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- worker ----------------------------------------------------------------------
    def _worker(self) -> None:
        # probe the kernel now, off the caller's thread, not in the first cleanup
        warm = getattr(self._ct, "capabilities", None)
        if callable(warm):
            try:
                warm()
            except Exception as exc:  # the first pass will report it
                LOG.debug("conntrack capability probe failed: %s", exc)
        while True:
            with self._cond:
                while (not self._queue or self._holds) and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing, nothing left
                batch, self._queue = self._queue, []
            try:
                for chunk in self._chunks(batch):
                    self._run_pass(chunk)
            except BaseException as exc:  # never die: fail what is left, keep serving
                LOG.exception("conntrack manager worker error")
                err = _as_error(exc)
                for req in batch:
                    if not req.handle.done():
                        self._release(req)
                        req.handle._finish(None, err)

    def _chunks(self, batch: List[_Request]) -> Iterator[List[_Request]]:
        chunk: List[_Request] = []
        size = 0
        for req in batch:
            n = len(req.handle.filters)
            if chunk and size + n > self.max_filters_per_pass:
                yield chunk
                chunk, size = [], 0
            chunk.append(req)
            size += n
        if chunk:
            yield chunk

    def _release(self, req: _Request) -> None:
        if req.release_keys and self._release_fn is not None:
            self._release_fn(req.release_keys)

    def _run_pass(self, batch: List[_Request]) -> None:
        filters: List[Filter] = []
        index: Dict[Filter, int] = {}
        owned: List[List[int]] = []
        for req in batch:
            mine = []
            for f in req.handle.filters:
                if f not in index:  # identical filter of an earlier request: counted there
                    index[f] = len(filters)
                    filters.append(f)
                    mine.append(index[f])
            owned.append(mine)
        start = time.perf_counter()
        try:
            # inputs were validated at submit (zone-0 consent included)
            results = self._ct.delete_each(filters, allow_default_zone=True)
        except Exception as exc:
            err = _as_error(exc)
            with self._cond:
                self.passes += 1
                self.failed_passes += 1
            LOG.error("conntrack cleanup pass of %d requests (%d filters) failed: %s (errno %s)",
                      len(batch), len(filters), err, err.errno)
            for req in batch:
                self._release(req)
                req.handle._finish(None, err)
            return
        elapsed = time.perf_counter() - start
        walks = max((r.walks for r in results), default=0)
        strategy = results[0].strategy if results else "walk"
        with self._cond:
            self.passes += 1
            self.walks += walks
        reason = (f"coalesced pass: {len(batch)} requests, {len(filters)} filters, "
                  f"{walks} walk{'s' if walks != 1 else ''}")
        failed_total = 0
        for req, mine in zip(batch, owned):
            rs = [results[i] for i in mine]
            r = DeleteResult(sum(x.matched for x in rs), sum(x.deleted for x in rs),
                             sum(x.already_gone for x in rs), sum(x.failed for x in rs),
                             next((x.errno for x in rs if x.errno), 0), strategy, walks,
                             elapsed, reason)
            failed_total += r.failed
            self._release(req)
            req.handle._finish(r, None)
        if failed_total:
            first = next((x.errno for x in results if x.errno), 0)
            LOG.warning("conntrack cleanup: %d deletes failed (first errno %d: %s)",
                        failed_total, first, _errno.errorcode.get(first, "?"))
        LOG.debug("%s in %.3f s", reason, elapsed)


__all__ = ["CleanupHandle", "CleanupQueue"]
