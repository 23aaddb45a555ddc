"""Working hours of a skill (`[skills.<id>.hours]`), pure: is it open, when does it open next, and
when has a stay lasted N seconds of open time (off hours suspend the waiting and agent timers).

`hours=None` means always open. Times are epoch ms; days are the skill's local days (zoneinfo),
so a daylight-saving change moves the spans with the wall clock.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

from streams.core.config import Hours

SEARCH_DAYS = 400  # how far ahead an opening is looked for (past a year of holidays); beyond: never
_MIDNIGHT = time(0, 0)


SPAN_CACHE_DAYS = 512  # days of spans remembered per skill's hours (then forgotten at once)


def _spans_of_day(hours: Hours, day: date) -> list[tuple[int, int]]:
    """The open spans of one local day, as epoch ms (remembered: a pure function of the day)."""
    cache = hours.span_cache
    spans = cache.get(day)
    if spans is None:
        if len(cache) >= SPAN_CACHE_DAYS:
            cache.clear()
        spans = cache[day] = _compute_spans(hours, day)
    return spans


def _compute_spans(hours: Hours, day: date) -> list[tuple[int, int]]:
    if day in hours.closed_dates:
        return []
    out = []
    for start_min, end_min in hours.week[day.weekday()]:
        start = datetime.combine(day, time(start_min // 60, start_min % 60), tzinfo=hours.zone)
        if end_min == 24 * 60:
            end = datetime.combine(day + timedelta(days=1), _MIDNIGHT, tzinfo=hours.zone)
        else:
            end = datetime.combine(day, time(end_min // 60, end_min % 60), tzinfo=hours.zone)
        out.append((int(start.timestamp() * 1000), int(end.timestamp() * 1000)))
    return out


def _local_day(hours: Hours, at_ms: int) -> date:
    return datetime.fromtimestamp(at_ms / 1000, tz=hours.zone).date()


def _spans_from(hours: Hours, at_ms: int) -> list[tuple[int, int]]:
    """Open spans that end after `at_ms`, in order, over the next `SEARCH_DAYS` days (lazily)."""
    out: list[tuple[int, int]] = []
    if not any(hours.week):
        return out  # closed every day of the week
    day = _local_day(hours, at_ms) - timedelta(days=1)  # a span of yesterday may run past midnight
    for i in range(SEARCH_DAYS + 1):
        out.extend(s for s in _spans_of_day(hours, day + timedelta(days=i)) if s[1] > at_ms)
        if out and i >= 1:
            return out
    return out


def is_open(hours: Hours | None, at_ms: int) -> bool:
    """Is the skill open at `at_ms`?"""
    if hours is None:
        return True
    return any(start <= at_ms < end for start, end in _spans_from(hours, at_ms)[:3])


def next_open(hours: Hours | None, at_ms: int) -> int | None:
    """The first instant at or after `at_ms` when the skill is open; None when it never opens."""
    if hours is None:
        return at_ms
    spans = _spans_from(hours, at_ms)
    return max(spans[0][0], at_ms) if spans else None


def off_hours_end(hours: Hours | None, at_ms: int) -> int | None:
    """When the off-hours period around `at_ms` ends (identifies the period); None when open now
    (or never opening again: then -1 identifies the one endless period)."""
    if is_open(hours, at_ms):
        return None
    opening = next_open(hours, at_ms)
    return -1 if opening is None else opening


def add_open_time(hours: Hours | None, start_ms: int, seconds: int) -> int | None:
    """The instant when `seconds` of open time have passed since `start_ms`; None if never."""
    if hours is None:
        return start_ms + seconds * 1000
    left = seconds * 1000
    at = start_ms
    for _ in range(SEARCH_DAYS):
        spans = _spans_from(hours, at)
        if not spans:
            return None
        for start, end in spans:
            begin = max(start, at)
            if end - begin >= left:
                return begin + left
            left -= end - begin
            at = end
    return None
