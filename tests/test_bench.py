"""python -m minird.bench: bad arguments are one-line errors before any measuring (the benchmark
itself prints tables and is run by hand; no timing is tested)."""

import pytest
import torch

from helpers import assert_one_line_error, run_script


@pytest.mark.parametrize("args, fragment", [
    (["--threads=-1"], "--threads must be >= 0"),
    (["--device=tpu"], "invalid choice: 'tpu'"),
    pytest.param(["--device=cuda"], "--device=cuda but this torch has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: the run would measure")),
])
def test_bad_arguments_are_one_line_errors(args, fragment):
    result = run_script("-m", "minird.bench", *args)
    assert_one_line_error(result, "minird.bench:", fragment)
    assert result.stdout == ""
