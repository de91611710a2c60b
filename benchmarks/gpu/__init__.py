"""The GPU check's parts, one job each; ``benchmarks/gpu_check.py`` is the one entry point.

* ``common``: shapes, the bytes model, GB/s, tables, the report file, the time budget;
* ``device_time``: device time from the profiler (the sum of kernel durations) and CUDA-graph replay;
  host time of the collective ops;
* ``site_kernels``: which generated kernels serve which BatchNorm site (bnpass's record, and a
  recording backend for stock Inductor), and the per-site table of what bnpass adds on the device;
* ``correctness``: compiled bnpass against float64 on CUDA (section 1);
* ``bn_shapes``: BatchNorm forward+backward per shape and provider, in device time (section 2);
* ``end_to_end``: a training step, out of graphs and in CUDA graphs, device time per step, the
  per-site table, host time per collective (section 3);
* ``targets``: issue 16's targets against the figures;
* ``dry_run``: all of it on the CPU, with CPU timings labelled as such.
"""
