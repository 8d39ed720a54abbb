"""The repository's benchmarks (not part of the installed ``gqsa`` package): the scripts here
(``python benchmarks/X.py`` from the repository root, with ``PYTHONPATH=src`` or gqsa installed) and the benchmarks
of ``gqsa bench`` in bench/. A package so that ``benchmarks.bench`` imports from the repository root."""
