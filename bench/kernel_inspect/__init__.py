"""The parts of ``bench/inspect_kernels.py``, the team's GPU-less performance instrument: compile hooks
(``hooks``), compiler output (``cubin``), floors and occupancy (``roofline``), the torch side (``torch_side``)
and the tables (``tables``). Named ``kernel_inspect``, not ``inspect``: bench/ is on sys.path when the benchmarks
run, and a package called ``inspect`` there would shadow the standard library's."""
