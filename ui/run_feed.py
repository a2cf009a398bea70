"""The console's run event stream: one reader per followed run, shared by every client that follows it.

``GET /etl/data-loader/api/runs/<job>/<run>/events`` (Server-Sent Events). However many clients follow
a run, one thread of this process looks at it once per :data:`loader.follow.FOLLOW_SECONDS` (a
:class:`loader.follow.RunFollower`: the change signature, and on a change the run's summary and the
batches that moved) and hands the events to each client's queue. A client that connects gets the
run's present state at once (the feed's last "run" event, or one read of its own if the feed has
none yet), the batches changed since its ``Last-Event-ID`` if it sends one, then every change; a
comment every :data:`KEEPALIVE_SECONDS` keeps proxies from closing a quiet stream; the stream ends
after the "run" event of a final status. A client that does not read falls behind by at most
:data:`CLIENT_BACKLOG` events, then its stream is closed: it reconnects with its ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from loader import config
from loader.contract import change_signature
from loader.follow import FOLLOW_SECONDS, RunEvent, RunFollower

#: Seconds between two keep-alive comments on a quiet stream.
KEEPALIVE_SECONDS = 15.0
#: Events a client may have unread before its stream is closed (it resumes with Last-Event-ID).
CLIENT_BACKLOG = 20_000
#: Seconds a feed goes on reading after its last client left (a reconnect finds it warm).
LINGER_SECONDS = 10.0
#: How often the client tells the browser to reconnect after a dropped stream (ms).
RETRY_MS = 2000


def encode(event: RunEvent) -> bytes:
    """One event in the text/event-stream format (its JSON is one line: no ``data:`` continuation)."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, event.event.encode(), orjson.dumps(event.data))


class _Client:
    """One stream's queue, filled from the feed's thread, read on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RunEvent | None] = asyncio.Queue()
        self.dropped = False

    def push(self, events: list[RunEvent]) -> None:
        def put() -> None:
            if self.dropped:
                return
            if self.queue.qsize() + len(events) > CLIENT_BACKLOG:
                self.dropped = True
                self.queue.put_nowait(None)  # too far behind: end the stream, the client resumes
                return
            for e in events:
                self.queue.put_nowait(e)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            self.loop.call_soon_threadsafe(put)


class Feed:
    """One followed run: a thread polls it while it has clients (and :data:`LINGER_SECONDS` after)."""

    def __init__(self, job: str, run: str, on_idle: Callable[[Feed], None]) -> None:
        self.job, self.run = job, run
        self._on_idle = on_idle
        self._lock = threading.Lock()
        self._clients: set[_Client] = set()
        self.last_run: RunEvent | None = None
        self._thread: threading.Thread | None = None
        self.reads = 0  # polls that found a change (for the benchmark)
        self.looks = 0  # polls

    def add(self, client: _Client) -> RunEvent | None:
        """Register a client; returns the run's last "run" event, if the feed has one."""
        with self._lock:
            self._clients.add(client)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"feed-{self.job}/{self.run}", daemon=True)
                self._thread.start()
            return self.last_run

    def remove(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)

    def _loop(self) -> None:
        follower = RunFollower(self.job, self.run)
        idle_since: float | None = None
        stop = threading.Event()
        tick = time.monotonic()
        while True:
            try:
                events = follower.poll()
            except Exception as exc:  # noqa: BLE001 - the database is away or the run is gone: tell, go on
                events = []
                self._broadcast_error(str(exc))
            self.looks += 1
            if events:
                self.reads += 1
            with self._lock:
                for e in events:
                    if e.event == "run":
                        self.last_run = e
                clients = list(self._clients)
                if not clients:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > LINGER_SECONDS:
                        self._thread = None
                        self._on_idle(self)
                        return
                else:
                    idle_since = None
            if events:
                for c in clients:
                    c.push(events)
            # On a fixed beat, not a pause after each look: a change waits at most one beat plus one read.
            tick = max(tick + FOLLOW_SECONDS, time.monotonic())
            stop.wait(tick - time.monotonic())

    def _broadcast_error(self, message: str) -> None:
        with self._lock:
            clients = list(self._clients)
        error = RunEvent("error", self.last_run.id if self.last_run else 0, {"error": message[:500]})
        for c in clients:
            c.push([error])


class Feeds:
    """The process's feeds, one per followed run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._feeds: dict[tuple[str, str], Feed] = {}

    def get(self, job: str, run: str) -> Feed:
        with self._lock:
            feed = self._feeds.get((job, run))
            if feed is None:
                feed = self._feeds[(job, run)] = Feed(job, run, self._forget)
            return feed

    def _forget(self, feed: Feed) -> None:
        with self._lock:
            if self._feeds.get((feed.job, feed.run)) is feed:
                del self._feeds[(feed.job, feed.run)]

    def __len__(self) -> int:
        return len(self._feeds)


_feeds = Feeds()


def feeds() -> Feeds:
    return _feeds


def max_streams() -> int:
    """ETL_CONSOLE_MAX_STREAMS: event streams open at once in this process; more answer 503."""
    return config.get_int("ETL_CONSOLE_MAX_STREAMS", minimum=1)


class _Open:
    count = 0
    lock = threading.Lock()


def open_stream() -> bool:
    with _Open.lock:
        if _Open.count >= max_streams():
            return False
        _Open.count += 1
        return True


def close_stream() -> None:
    with _Open.lock:
        _Open.count -= 1


async def stream(job: str, run: str, first: list[RunEvent]) -> AsyncIterator[bytes]:
    """The bytes of one client's stream: ``first`` (read when it connected), then the feed's events.

    The caller has taken a slot with :func:`open_stream`; it is given back when the stream ends.
    """
    client = _Client(asyncio.get_running_loop())
    feed = feeds().get(job, run)
    try:
        yield b"retry: %d\n\n" % RETRY_MS
        last_run = feed.add(client)
        sent_top = -1
        for e in first:
            yield encode(e)
            sent_top = max(sent_top, e.id)
            if e.final:
                return
        if last_run is not None and last_run.id > sent_top:
            yield encode(last_run)
            if last_run.final:
                return
        while True:
            try:
                event = await asyncio.wait_for(client.queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if event is None:
                return
            yield encode(event)
            if event.final:
                return
    finally:
        feed.remove(client)
        close_stream()


def first_events(job: str, run: str, after: int | None) -> list[RunEvent]:
    """What a connecting client gets before the live events (raises RunNotFound for an unknown run).

    Resuming (``after``): the batches changed since and the run as it is now, one read of its own.
    Starting: nothing when the run's feed already has its state (the stream sends the feed's last
    "run" event), else the run as it is now. Fifty clients that connect at once cost one signature
    read each, not fifty summaries.
    """
    if after is None and feeds().get(job, run).last_run is not None:
        change_signature(job, run)  # the run may have been deleted since: 404, not an empty stream
        return []
    return RunFollower(job, run, after=after).poll()


def parse_last_event_id(value: str | None) -> int | None:
    """``Last-Event-ID`` as a change number; anything else (absent, not a number) starts from now."""
    if value is None or not value.strip().isdigit() or len(value.strip()) > 19:
        return None
    return int(value.strip())


def feed_stats() -> dict[str, Any]:
    """Feeds and their reads so far (the benchmark's evidence that clients share one reader)."""
    with _feeds._lock:
        return {f"{job}/{run}": {"looks": f.looks, "reads": f.reads} for (job, run), f in _feeds._feeds.items()}
