"""A custom reward whose compute_score fails on every sample: the run must stop naming the row it was scoring."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    raise ValueError(f"cannot grade answers for ground truth {ground_truth!r}")
