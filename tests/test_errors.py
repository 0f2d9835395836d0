"""Errors cross process boundaries intact: a worker pool re-raises them in the parent."""

from __future__ import annotations

import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest

from umit.deid.engine import BurnedInError
from umit.errors import GeometryError, InputError
from umit.privacy.deface.plausible import ImplausibleResult


def _raise_input_error(path: str) -> None:
    raise InputError(path, "no label map")


@pytest.mark.parametrize("cls", [InputError, GeometryError, BurnedInError])
def test_input_errors_pickle_with_path_problem_and_message(cls):
    err = cls("case_7.nii.gz", "slices are not uniform")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert (back.path, back.problem, str(back)) == (err.path, err.problem, str(err))
    none = pickle.loads(pickle.dumps(cls(None, "bad value")))
    assert none.path is None and str(none) == "bad value"


def test_implausible_result_pickles_with_its_result():
    back = pickle.loads(pickle.dumps(ImplausibleResult("head.nii", "not a face", {"depth": 3})))
    assert back.result == {"depth": 3} and str(back) == "head.nii: not a face"


def test_an_input_error_in_a_worker_process_reaches_the_parent_with_its_message():
    with ProcessPoolExecutor(1) as pool:
        future = pool.submit(_raise_input_error, "runs/x/case_3")
        with pytest.raises(InputError, match="runs/x/case_3: no label map"):
            future.result()
