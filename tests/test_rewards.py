"""Reward functions: hand-checked answers, custom functions loaded from files, and loud failures."""
from __future__ import annotations

import pickle

import pytest
from omegaconf import OmegaConf

from spinlm.rewards import RewardError, check_reward, get_reward_fn, score_samples
from spinlm.rewards import exact_match, gsm8k, math_boxed

CFG = {"custom_path": None, "custom_name": "compute_score", "gsm8k_method": "strict"}


@pytest.mark.parametrize("text,strict,flexible", [
    ("3 + 4 = 7\n#### 7", "7", "7"),
    ("so 1,234 apples\n#### 1,234", "1234", "1234"),
    ("#### 5 was wrong, fix: #### 12", "12", "12"),
    ("#### $18", "18", "18"),
    ("#### -3.5", "-3.5", "-3.5"),
    ("the answer is 42.", None, "42"),
    ("#### 7 then #### none", None, "7"),
    ("I think 10 or maybe 3-4", None, "4"),
    ("x = -5", None, "-5"),
    ("no digits here", None, None),
])
def test_gsm8k_extract(text, strict, flexible):
    assert gsm8k.extract_solution(text, "strict") == strict
    assert gsm8k.extract_solution(text, "flexible") == flexible


def test_gsm8k_score():
    assert gsm8k.compute_score("gsm8k", "... #### 19", "19") == 1.0
    assert gsm8k.compute_score("gsm8k", "... #### 19.0", "19") == 1.0   # compared as numbers
    assert gsm8k.compute_score("gsm8k", "... #### 19", "19.00") == 1.0
    assert gsm8k.compute_score("gsm8k", "... #### 1,000", "1000") == 1.0
    assert gsm8k.compute_score("gsm8k", "... #### 18", "19") == 0.0
    assert gsm8k.compute_score("gsm8k", "the answer is 19", "19") == 0.0          # strict needs ####
    assert gsm8k.compute_score("gsm8k", "the answer is 19", "19", method="flexible") == 1.0
    with pytest.raises(ValueError, match="method 'loose'"):
        gsm8k.extract_solution("#### 1", "loose")
    with pytest.raises(ValueError, match="needs a ground truth"):
        gsm8k.compute_score("gsm8k", "#### 1", None)


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{5}", "5"),
    (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{x^{2}+{1}}} done", r"\sqrt{x^{2}+{1}}"),
    (r"\boxed{ unclosed {", None),
    ("nothing boxed", None),
])
def test_last_boxed(text, expected):
    assert math_boxed.last_boxed(text) == expected


def test_math_boxed_score():
    assert math_boxed.compute_score("math", r"We get $\boxed{\dfrac{1}{2}}$.", r"\frac{1}{2}") == 1.0
    assert math_boxed.compute_score("math", r"\boxed{\left( 1, 2 \right).}", "(1,2)") == 1.0
    assert math_boxed.compute_score("math", r"\boxed{x \rightarrow y}", r"x\rightarrow y") == 1.0
    assert math_boxed.compute_score("math", r"\boxed{\frac{1}{3}}", r"\frac{1}{2}") == 0.0
    assert math_boxed.compute_score("math", "1/2", "1/2") == 0.0                 # no box, no credit
    # a full reference solution as ground truth: its boxed answer is compared
    assert math_boxed.compute_score("math", r"\boxed{7}", r"3+4 = \boxed{7}") == 1.0


def test_exact_match():
    assert exact_match.compute_score("exact_match", "  46\n", "46") == 1.0
    assert exact_match.compute_score("exact_match", "46 ", "4 6") == 0.0


def test_builtin_dispatch_by_data_source():
    fn = get_reward_fn(CFG)
    items = [("openai/gsm8k", "#### 7", "7", {}, "a:0"), ("tiny_arith", "7", "7", {}, "a:1"),
             ("lighteval/MATH", r"\boxed{7}", "7", {}, "a:2"), ("exact_match", " 7 ", "7", {}, "a:3"),
             ("math_dapo", r"\boxed{8}", "7", {}, "a:4")]
    assert score_samples(fn, items) == [1.0, 0.0, 1.0, 1.0, 0.0]
    flexible = get_reward_fn(OmegaConf.create({**CFG, "gsm8k_method": "flexible"}))
    assert score_samples(flexible, [("gsm8k", "it is 7", "7", {}, "a:1")]) == [1.0]
    assert pickle.loads(pickle.dumps(fn))(data_source="gsm8k", solution_str="#### 2", ground_truth="2") == 1.0


def test_unknown_data_source_and_missing_ground_truth_name_the_row():
    fn = get_reward_fn(CFG)
    with pytest.raises(RewardError) as info:
        score_samples(fn, [("gsm8k", "#### 1", "1", {}, "t.parquet:0"), ("trivia", "x", "x", {}, "t.parquet:1")])
    msg = str(info.value)
    assert msg.startswith("t.parquet:1: ") and "'trivia'" in msg and "openai/gsm8k" in msg and "math_dapo" in msg
    with pytest.raises(RewardError, match=r"t\.parquet:4: .*needs a ground truth"):
        score_samples(fn, [("gsm8k", "#### 1", None, {}, "t.parquet:4")])
    with pytest.raises(RewardError, match="reward.gsm8k_method='fuzzy'"):
        get_reward_fn({**CFG, "gsm8k_method": "fuzzy"})


def custom(tmp_path, body: str, name: str = "my_reward.py") -> dict:
    path = tmp_path / name
    path.write_text(body)
    return {**CFG, "custom_path": str(path)}


def test_custom_function_from_file(tmp_path):
    cfg = custom(tmp_path, "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                           "    return len(solution_str) / 10 + extra_info['bonus']\n"
                           "def as_dict(data_source, solution_str, ground_truth, extra_info=None):\n"
                           "    return {'score': 0.5, 'acc': True}\n")
    fn = get_reward_fn(cfg)
    assert score_samples(fn, [("anything", "abcd", None, {"bonus": 1}, "f:0")]) == [pytest.approx(1.4)]
    assert score_samples(get_reward_fn({**cfg, "custom_name": "as_dict"}), [("x", "s", "g", {}, "f:0")]) == [0.5]
    assert check_reward(cfg) == []


def test_custom_function_failures_are_loud(tmp_path):
    cfg = custom(tmp_path, "import math\n"
                           "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                           "    if solution_str == 'boom':\n"
                           "        raise KeyError('missing key')\n"
                           "    if solution_str == 'nan':\n"
                           "        return math.nan\n"
                           "    return 'high'\n")
    fn = get_reward_fn(cfg)
    with pytest.raises(RewardError) as info:
        score_samples(fn, [("d", "boom", "g", {}, "data/train.parquet:17")])
    assert str(info.value) == ("data/train.parquet:17: reward function compute_score raised KeyError: "
                               "'missing key'")
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RewardError, match=r"^data/v\.jsonl:3: reward function compute_score returned nan"):
        score_samples(fn, [("d", "nan", "g", {}, "data/v.jsonl:3")])
    with pytest.raises(RewardError, match=r"^x:0: reward function compute_score returned 'high' \(str\)"):
        score_samples(fn, [("d", "ok", "g", {}, "x:0")])
    inf_cfg = custom(tmp_path, "def compute_score(**kw):\n    return float('inf')\n", "inf.py")
    with pytest.raises(RewardError, match="returned inf"):
        score_samples(get_reward_fn(inf_cfg), [("d", "s", "g", {}, "x:1")])


def test_custom_file_problems(tmp_path):
    missing = {**CFG, "custom_path": str(tmp_path / "nope.py")}
    with pytest.raises(RewardError, match="reward.custom_path=.*nope.py.*file not found"):
        get_reward_fn(missing)
    assert "file not found" in check_reward(missing)[0]

    broken = custom(tmp_path, "import not_a_real_module_xyz\n", "broken.py")
    (problem,) = check_reward(broken)
    assert "importing it failed with ModuleNotFoundError" in problem and "not_a_real_module_xyz" in problem
    syntax = custom(tmp_path, "def f(:\n", "syntax.py")
    assert "importing it failed with SyntaxError" in check_reward(syntax)[0]
    exits = custom(tmp_path, "import sys\nsys.exit(3)\n", "exits.py")
    assert "importing it failed with SystemExit" in check_reward(exits)[0]

    no_fn = custom(tmp_path, "def other(**kw):\n    return 1.0\n", "nofn.py")
    assert check_reward(no_fn) == [f"reward.custom_name='compute_score': {no_fn['custom_path']} has no function "
                                   "of that name"]
    not_callable = custom(tmp_path, "compute_score = 3\n", "notcall.py")
    assert "as int, not a function" in check_reward(not_callable)[0]


def test_check_reward_names_unknown_data_sources():
    assert check_reward(CFG, ["gsm8k", "math"]) == []
    (problem,) = check_reward(CFG, ["gsm8k", "trivia"])
    assert problem.startswith("data_source 'trivia': no built-in reward")


def test_a_reward_past_its_deadline_stops_naming_the_row(tmp_path):
    """A pure-Python loop that also swallows ordinary exceptions: the deadline still ends it (before: a hang)."""
    import time

    cfg = {**custom(tmp_path, "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                              "    if solution_str == 'fast':\n        return 1.0\n"
                              "    while True:\n        try:\n            pass\n        except Exception:\n"
                              "            pass\n"), "timeout_s": 0.3}
    fn = get_reward_fn(cfg)
    start = time.perf_counter()
    with pytest.raises(RewardError, match=r"^t\.parquet:7: reward function compute_score did not return within "
                                          r"reward\.timeout_s=0\.3 s"):
        score_samples(fn, [("x", "fast", "1", {}, "t.parquet:6"), ("x", "slow", "1", {}, "t.parquet:7")])
    assert time.perf_counter() - start < 5
    assert score_samples(fn, [("x", "fast", "1", {}, "t.parquet:0")]) == [1.0]  # the alarm was disarmed
    time.sleep(0.4)  # no stray alarm goes off later
    assert pickle.loads(pickle.dumps(get_reward_fn({**CFG, "timeout_s": 5.0})))(
        data_source="gsm8k", solution_str="#### 2", ground_truth="2") == 1.0


def test_a_reward_that_calls_sys_exit_stops_naming_the_row(tmp_path):
    fn = get_reward_fn(custom(tmp_path, "import sys\n"
                                        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                                        "    sys.exit(0)\n"))
    with pytest.raises(RewardError, match=r"^t\.parquet:3: reward function compute_score called sys\.exit\(0\); "
                                          r"a reward must return a number$"):
        score_samples(fn, [("x", "y", "1", {}, "t.parquet:3")])


@pytest.mark.parametrize("text,method,expected", [
    ("3 + 4 = 7\n#### 7", "strict", 1.0),   # right: the full score
    ("3 + 4 = 8\n#### 8", "strict", 0.1),   # wrong but in the '#### n' form: the format score
    ("3 + 4 = 7", "strict", 0.0),           # no '#### ': nothing, even though 7 is right
    ("3 + 4 = 7", "flexible", 1.0),
    ("3 + 4 is 8", "flexible", 0.1),        # flexible: any last number is the form
    ("no digits here", "flexible", 0.0),
])
def test_gsm8k_format_score_like_verl(text, method, expected):
    assert gsm8k.compute_score("openai/gsm8k", text, "7", method=method, format_score=0.1) == expected


def test_format_score_only_where_samples_are_judged():
    cfg = {**CFG, "format_score": 0.25}
    judge, accuracy = get_reward_fn(cfg, judging=True), get_reward_fn(cfg)
    assert judge("openai/gsm8k", "#### 8", "7") == 0.25
    assert accuracy("openai/gsm8k", "#### 8", "7") == 0.0  # val/acc counts right answers only
    assert judge("openai/gsm8k", "#### 7", "7") == accuracy("openai/gsm8k", "#### 7", "7") == 1.0
