"""The network, from config to modules: the shape plan (plan.py: receptive field, stride,
padding, filters, pooling, hidden units, computed before any tensor exists), memory needs
(memory.py), the describe table (table.py), the torch modules (modules.py) and
cnnstudy's own CPU kernels (cpu_kernels.py, csrc/)."""
