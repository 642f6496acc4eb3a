"""Run train_tiny.py unchanged under torchrun, recording on every rank the (n, k) step counts of
each training forward and the final weights, for test_train.py's DDP test:

    torchrun --standalone --nproc_per_node=2 tests/ddp_probe.py REPORT_DIR train_tiny.py --key=value ...

writes REPORT_DIR/rank<R>.pt.
"""

import os
import runpy
import sys

import torch

from minird.model import RecurrentDepthLM

report_dir, script, *args = sys.argv[1:]
steps = []
iterate = RecurrentDepthLM.iterate


def recording_iterate(self, e, num_steps, *rest, **kwargs):
    if self.training:  # evaluation runs fixed r; only training draws (n, k)
        steps.append(list(num_steps))
    return iterate(self, e, num_steps, *rest, **kwargs)


RecurrentDepthLM.iterate = recording_iterate
sys.argv = [script, *args]
trainer = runpy.run_path(script, run_name="__main__")
torch.save({"steps": steps, "weights": trainer["result"]["model"].state_dict()},
           os.path.join(report_dir, f"rank{os.environ['RANK']}.pt"))
