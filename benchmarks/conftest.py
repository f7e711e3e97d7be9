"""``--benchmark``: full sizes, warm-up and rounds, JSON saved under benchmarks/results/.

Without it every case runs once at a small size: a smoke test that keeps the suite
working inside ``make test``.
"""

import datetime
import os
from pathlib import Path

import pytest

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the full benchmark (default: a quick smoke run of every case)")


def pytest_configure(config):
    full = config.getoption("--benchmark", default=False)
    os.environ["ECHO_BENCH_FULL"] = "1" if full else "0"
    if full and not config.getoption("benchmark_json", default=None):
        os.makedirs(RESULTS, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        config.option.benchmark_json = Path(RESULTS) / f"run-{stamp}.json"


@pytest.fixture
def full_mode(request) -> bool:
    return request.config.getoption("--benchmark")
