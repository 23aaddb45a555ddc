"""Working hours (zoneinfo, holidays, DST) and Meta's windows on Meta's clock: the pure functions."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from streams.core.config import ConfigError, Hours, Messaging
from streams.rules.conversation.hours import add_open_time, is_open, next_open, off_hours_end
from streams.rules.conversation.windows import in_response_window, meta_time, newest, send_mode, window_end
from tests.rules.convo import DAY, HOUR, cfg

MADRID = ZoneInfo("Europe/Madrid")
SALES = Hours(timezone="Europe/Madrid", mon=["09:00-13:00", "14:00-18:00"], tue=["09:00-18:00"],
              fri=["22:00-24:00"], sat=["00:00-02:00"], holidays=["2026-12-22"])


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, tz: ZoneInfo = MADRID) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=tz).timestamp() * 1000)


@pytest.mark.parametrize(
    ("at", "open_"),
    [
        (ms(2026, 6, 1, 9, 0), True),  # Monday 09:00 local (07:00 UTC in summer)
        (ms(2026, 6, 1, 8, 59), False),
        (ms(2026, 6, 1, 13, 30), False),  # lunch
        (ms(2026, 6, 1, 17, 59), True),
        (ms(2026, 6, 1, 18, 0), False),  # the end is exclusive
        (ms(2026, 6, 3, 10, 0), False),  # Wednesday: left out, closed all day
        (ms(2026, 6, 5, 23, 30), True),  # Friday 22:00-24:00
        (ms(2026, 6, 6, 1, 0), True),  # Saturday 00:00-02:00
        (ms(2026, 12, 22, 10, 0), False),  # a Tuesday, but a holiday
        (ms(2026, 12, 29, 10, 0), True),
    ],
)
def test_is_open(at: int, open_: bool) -> None:
    assert is_open(SALES, at) is open_


def test_no_hours_is_always_open() -> None:
    assert is_open(None, 0) and next_open(None, 5) == 5 and off_hours_end(None, 5) is None
    assert add_open_time(None, 1000, 15) == 16_000


def test_next_open_and_the_off_hours_period() -> None:
    assert next_open(SALES, ms(2026, 6, 1, 13, 5)) == ms(2026, 6, 1, 14, 0)
    assert next_open(SALES, ms(2026, 6, 2, 18, 0)) == ms(2026, 6, 5, 22, 0)  # Tuesday evening → Friday 22:00
    assert next_open(SALES, ms(2026, 6, 1, 10, 0)) == ms(2026, 6, 1, 10, 0)
    # every instant of one off-hours period names the same end
    assert off_hours_end(SALES, ms(2026, 6, 2, 19, 0)) == off_hours_end(SALES, ms(2026, 6, 4, 3, 0))
    assert off_hours_end(SALES, ms(2026, 6, 2, 10, 0)) is None
    never = Hours(timezone="UTC")
    assert next_open(never, 0) is None and off_hours_end(never, 0) == -1 and add_open_time(never, 0, 15) is None


def test_open_time_skips_closed_hours() -> None:
    # 30 min before lunch + 30 min after it
    assert add_open_time(SALES, ms(2026, 6, 1, 12, 30), 3600) == ms(2026, 6, 1, 14, 30)
    # queued on Monday night: the clock runs from Tuesday 09:00
    assert add_open_time(SALES, ms(2026, 6, 1, 20, 0), 120) == ms(2026, 6, 2, 9, 2)
    # across midnight Friday → Saturday without a gap
    assert add_open_time(SALES, ms(2026, 6, 5, 23, 30), 3600) == ms(2026, 6, 6, 0, 30)


def test_daylight_saving_moves_with_the_wall_clock() -> None:
    # Madrid goes from +01:00 to +02:00 on 2026-03-29: Monday 09:00 is 08:00 UTC before, 07:00 UTC after
    assert next_open(SALES, ms(2026, 3, 23, 0, 0)) == ms(2026, 3, 23, 8, 0, tz=ZoneInfo("UTC"))
    assert next_open(SALES, ms(2026, 3, 30, 0, 0)) == ms(2026, 3, 30, 7, 0, tz=ZoneInfo("UTC"))


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('timezone = "Mars/Olympus"\n', "unknown time zone"),
        ('timezone = "UTC"\nmon = ["9-17"]\n', 'is not "HH:MM-HH:MM"'),
        ('timezone = "UTC"\nmon = ["18:00-09:00"]\n', "start before end"),
        ('timezone = "UTC"\nmon = ["09:00-12:00", "11:00-13:00"]\n', "spans overlap"),
        ('timezone = "UTC"\nholidays = ["25/12/2026"]\n', "is not a date"),
        ('timezone = "UTC"\nmonday = []\n', "monday: unknown key"),
    ],
)
def test_bad_hours_stop_start_up(toml: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg("\n[skills.sales.hours]\n" + toml)
    assert needle in str(err.value) and "skills.sales.hours" in str(err.value)


def test_meta_time_is_the_events_timestamp_bounded_by_receive_time() -> None:
    assert meta_time({"timestamp": 1000}, 5000) == 1000  # retried late: Meta's time
    assert meta_time({"timestamp": 9000}, 5000) == 5000  # never later than received
    assert meta_time({"timestamp": 0}, 5000) == 5000 and meta_time({}, 5000) == 5000
    assert newest(None, 5) == 5 and newest(10, 5) == 10


def test_send_modes_by_window() -> None:
    m = Messaging()
    assert send_mode(None, 0, m, True) is None
    assert send_mode(0, 24 * HOUR, m, True) == ("RESPONSE", None)
    assert send_mode(0, 24 * HOUR + 1, m, True) == ("MESSAGE_TAG", "HUMAN_AGENT")
    assert send_mode(0, 24 * HOUR + 1, m, False) is None
    assert send_mode(0, 7 * DAY + 1, m, True) is None
    assert send_mode(0, HOUR, m, True, inside="UPDATE") == ("UPDATE", None)
    assert in_response_window(0, 24 * HOUR, m) and not in_response_window(0, 24 * HOUR + 1, m)
    assert window_end(0, m, True) == 7 * DAY and window_end(0, m, False) == DAY and window_end(None, m, True) is None
