"""A custom reward that never returns (and swallows ordinary exceptions): reward.timeout_s must stop the run
naming the row."""
import time


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    while True:
        try:
            time.sleep(3600)
        except Exception:
            pass
