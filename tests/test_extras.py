"""Optional extras: found without importing them, and install advice that works for a source checkout."""
from pathlib import Path

import spinlm
from spinlm.extras import install_hint, installed, missing_extra

CHECKOUT = Path(spinlm.__file__).resolve().parent.parent


def test_install_hint_names_this_checkout_not_the_package_index():
    assert install_hint("eval") == f'pip install -e "{CHECKOUT}[eval]"'
    assert install_hint("wandb") == f'pip install -e "{CHECKOUT}[trackers]"'  # trackers are one extra


def test_missing_extra_is_none_for_an_installed_package_and_the_hint_otherwise():
    assert installed("peft") and missing_extra("lora") is None  # peft is in the test extra
    assert not installed("surely_not_a_module_spinlm_needs")
    assert installed("lm_eval") == (missing_extra("eval") is None)
    if not installed("lm_eval"):
        assert missing_extra("eval") == install_hint("eval")
