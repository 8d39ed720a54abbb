"""The benchmarks behind ``gqsa bench``, kept out of the installed package (they need a source checkout).

``gqsa bench kernel`` runs kernel.py (its command line and CPU mode; ``--device cuda``: kernel_cuda.py, the run and
its report, with kernel_cuda_candidates.py and kernel_cuda_timing.py) and ``gqsa bench e2e`` runs e2e.py (with its
e2e_*.py files, one concern each). kernel_common.py also holds what every script in benchmarks/ shares: the git
revision, the machine line, the results JSON, and the splicing of generated blocks into markdown documents.
Without the ``gqsa`` command: ``PYTHONPATH=src python -m benchmarks.bench.kernel ...`` from the repository root.
"""
