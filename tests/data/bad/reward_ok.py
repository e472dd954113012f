"""A valid custom reward, used with a reward.custom_name that it does not define."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return float(solution_str.strip().endswith(str(ground_truth)))
