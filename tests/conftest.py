import os
import sys

# The tests import the top-level modules (triadapt, model, data, train) the way a user does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    # python -m pytest -q tests -m "not slow": the math in under a minute; the end-to-end runs are "slow"
    config.addinivalue_line("markers", "slow: an end-to-end run (train.py, torchrun, bench.py); minutes")
