"""bench/compare_glam_kernel_grads.py on the CPU: every kernel name is a way of the same SDPA there, so
each row's gradients equal flex's exactly (one value per parameter group: 10 in GLaM), and the
kernel is put back as it was found."""

import sys

import torch

from llamatron.models.glam import attention
from llamatron.testing.bench import load_bench


def test_every_kernel_gets_a_row_and_on_the_cpu_equals_flex(monkeypatch, capsys):
    bench = load_bench("compare_glam_kernel_grads")
    monkeypatch.setattr(sys, "argv", ["compare_glam_kernel_grads.py", "--size", "glam-debug", "--layers", "2",
                                      "--seq-len", "128", "--micro-batch", "2", "--device", "cpu"])
    monkeypatch.setattr(attention, "KERNEL", attention.KERNEL)
    before = attention.KERNEL
    torch.set_num_threads(1)
    assert bench.main() == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == set(attention.KERNELS) - {"flex"}
    assert all(len(cells) == 10 and all(float(c) == 0.0 for c in cells) for cells in rows.values()), rows
    assert attention.KERNEL == before
