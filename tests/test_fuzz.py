"""Bounded property-based fuzzing in CI (tests/fuzz.py has the properties and a longer entry point)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings

from .fuzz import SETTINGS, check_file, check_peft, mutants, peft_configs

BUDGET = int(os.environ.get("LORA_HUB_FUZZ_EXAMPLES", "300"))


@pytest.mark.slow
@settings(max_examples=BUDGET, **SETTINGS)
@given(data=mutants())
def test_mutated_files_never_crash_the_reader_or_the_validator(tmp_path, data) -> None:
    check_file(data, tmp_path)


@pytest.mark.slow
@settings(max_examples=BUDGET // 3, **SETTINGS)
@given(config=peft_configs())
def test_hostile_peft_configs_get_findings_not_crashes(tmp_path, config) -> None:
    check_peft(config, tmp_path)
