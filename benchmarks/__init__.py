"""Head-to-head benchmarks of exactflow against zuko, nflows and normflows.

Run ``python -m benchmarks.run --quick`` (under two minutes) or ``python -m benchmarks.run``
(the full table, under thirty minutes). The peers come from the ``bench`` extra
(``pip install -e ".[bench]"``); the library itself never imports them.
"""
