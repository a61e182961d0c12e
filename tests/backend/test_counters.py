"""The I/O counters of one process."""
from backend.counters import Counters


def test_counting_after_the_counters_closed_is_no_error(tmp_path):
    """A thread still finishing (a proxied op) counts after close: no
    AttributeError in the middle of its operation."""
    c = Counters(str(tmp_path))
    c.add("fsyncs")
    c.close()
    c.add("fsyncs")
    c.add_many((("fsyncs", 1),))
    c.close()
