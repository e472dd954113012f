"""A custom reward that calls sys.exit(0): before, the run ended with exit code 0 and no message."""
import sys


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    sys.exit(0)
