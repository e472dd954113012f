"""A custom reward that returns a string instead of a number: never read as a silent 0."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return "correct" if str(ground_truth) in solution_str else "wrong"
