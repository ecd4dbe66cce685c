"""Go time.ParseDuration syntax."""
import pytest

from reverst.durations import parse_duration


@pytest.mark.parametrize("text,seconds", [
    ("0", 0.0), ("-0", 0.0), ("+0", 0.0),
    ("500ms", 0.5), ("30s", 30.0), ("1m", 60.0), ("1h", 3600.0), ("1h30m", 5400.0),
    ("1.5s", 1.5), (".5s", 0.5), ("1.s", 1.0), ("2h45m30.5s", 9930.5), ("1m0s", 60.0),
    ("10us", 1e-5), ("10µs", 1e-5), ("10μs", 1e-5), ("1ns", 1e-9), ("100ms", 0.1),
    ("-1.5h", -5400.0), ("+20s", 20.0),
])
def test_valid(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize("value", [0, 20, 1.5])
def test_numbers_are_seconds(value):
    assert parse_duration(value) == float(value)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize("text", [
    "", "1", "30", "00", "s", ".s", "+-0", "1x", "1e3s", "1 s", " 1s", "1s ", "s1", "1S", "1d",
    "1.5", "-", "١s", "2562048h",
])
def test_invalid(text):
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    message = str(info.value)
    assert message.startswith("invalid duration ")
    assert len(message.splitlines()) == 1


def test_invalid_message_quotes_input():
    with pytest.raises(ValueError, match=r'^invalid duration "xyz"$'):
        parse_duration("xyz")


@pytest.mark.parametrize("value", [None, True, [1]])
def test_wrong_type(value):
    with pytest.raises(TypeError):
        parse_duration(value)
