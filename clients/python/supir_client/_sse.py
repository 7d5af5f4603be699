"""A Server-Sent Events reader (the WHATWG event-stream format), enough for `GET /v1/jobs/{id}/events`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    event: str
    data: str
    id: str | None


def events(lines: Iterable[str]) -> Iterator[Event | None]:
    """Each complete event; None for every other line (comments such as keep-alives included), so the caller can
    look at its clock while a stream is quiet."""
    name, event_id = "", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield Event(name or "message", "\n".join(data), event_id)
            name, data, event_id = "", [], None
            continue
        if not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                event_id = value
        yield None
