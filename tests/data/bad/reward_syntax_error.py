"""A custom reward file with a syntax error (an unclosed bracket): importing it must fail with a clear message."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return float(solution_str.strip() == ground_truth.strip()
