"""Randomly corrupted packed tensors through validation and every kernel: a clear error or a right answer, never
a crash or a read outside the buffers.

The fuzzing runs in a child process, so that a kernel reading out of bounds shows up as a failed test with the
case that crashed instead of taking pytest down with it. Every case corrupts one tensor of a valid packed weight
(row pointers, column indices, codes or zero points) at a random place, then:

* ``PackedWeight.validate`` either passes or raises FormatError;
* every exact kernel (the reference, the native CPU splits, the bound fast path, native dequantization, the
  packed embedding's row lookup) raises ValueError / IndexError exactly when the indices break the format's
  rules, and otherwise returns a finite result equal to the reference's on the corrupted weight (the int8-
  activation kernel: finite and close);
* a weight whose indices break the rules is refused by validation too.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gqsa.ops import cpu

FUZZ = textwrap.dedent(r'''
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from problems import awkward_packed
    from gqsa.format.packed import FormatError, PackedWeight
    from gqsa.ops import cpu
    from gqsa.ops.direct import bind_linear
    from gqsa.ops.linear import packed_linear, reference_linear
    from gqsa.nn.packed_embedding import PackedEmbedding

    cases, seed, formats = int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    counts = {"cases": 0, "refused": 0, "accepted": 0}

    def rand(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=gen))

    def corrupt(p):
        """A copy of p with one tensor corrupted at a random place; returns (copy, tensor name, what)."""
        t = {k: (None if v is None else v.clone()) for k, v in p.tensors_with_none().items()}
        names = ["crow_indices", "col_indices", "values"] + ([] if p.zero_point is None else ["zero_point"])
        name = names[rand(0, len(names))]
        target = t[name]
        if target.numel() == 0:
            name, target = "crow_indices", t["crow_indices"]
        flat = target.view(-1)
        i = rand(0, flat.numel())
        kind = rand(0, 4)
        if name == "crow_indices":
            n = p.nnz
            flat[i] = [rand(-3, 0), rand(n + 1, n + 50), rand(0, n + 1), 2**31 - 1][kind]
        elif name == "col_indices":
            g = p.num_groups
            info = torch.iinfo(flat.dtype)
            flat[i] = [rand(-4, 0), rand(g, g + 100), info.max if kind == 2 else info.min, rand(0, g)][kind]
        else:
            flat[i] = rand(0, 256)
        return PackedWeight(**t, out_features=p.out_features, in_features=p.in_features,
                            group_size=p.group_size, bits=p.bits), name, int(flat[i])

    def outcome(fn):
        try:
            return fn()
        except (ValueError, IndexError) as exc:
            if not str(exc):
                raise AssertionError(f"an error without a message: {exc!r}")
            return exc

    for bits, group_size, symmetric in formats:
        base = awkward_packed(bits, group_size, symmetric, n=13, groups=5, seed=seed)
        x = torch.randn(3, base.in_features, generator=gen)
        for case in range(cases):
            p, name, value = corrupt(base)
            label = f"W{bits} g{group_size} {'sym' if symmetric else 'asym'} case {case}: {name} <- {value}"
            print(label, flush=True)  # the last line printed names the case if the process crashes
            counts["cases"] += 1
            try:
                p.validate()
                valid = True
            except FormatError:
                valid = False
            try:
                from gqsa.format.packed import check_indices
                check_indices(p.crow_indices, p.col_indices, p.num_groups)
                indices_ok = True
            except FormatError:
                indices_ok = False
            assert indices_ok or not valid, label  # a broken index is never valid
            expected = None
            if indices_ok:
                expected = reference_linear(x, *p.tensors_with_none().values(), None, p.out_features,
                                            p.in_features, p.group_size, p.bits)
                assert torch.isfinite(expected).all(), label
            runs = {"reference": lambda: packed_linear(x, p, backend="reference")}
            if cpu.available():
                runs["cpu"] = lambda: packed_linear(x, p, backend="cpu")
                runs["cpu-rowsplit"] = lambda: packed_linear(x, p, backend="cpu-rowsplit")
                runs["cpu x1"] = lambda: packed_linear(x[:1], p, backend="cpu")
                runs["bound"] = lambda: bind_linear(*p.tensors_with_none().values(), None, p.out_features,
                                                    p.in_features, p.group_size, p.bits, "cpu")(x)
                runs["dequantize"] = lambda: cpu.dequantize_native(*p.tensors_with_none().values(),
                                                                   p.out_features, p.in_features, p.group_size,
                                                                   p.bits) @ x.T
                runs["embedding"] = lambda: PackedEmbedding(p)(torch.arange(p.out_features))
                if bits == 4 and group_size % 16 == 0:
                    runs["cpu-a8"] = lambda: packed_linear(x, p, backend="cpu-a8")
            for kernel, run in runs.items():
                result = outcome(run)
                if not indices_ok:
                    assert isinstance(result, Exception), f"{label}: {kernel} ran on broken indices"
                    continue
                assert not isinstance(result, Exception), f"{label}: {kernel} refused valid indices: {result}"
                assert torch.isfinite(result).all(), f"{label}: {kernel}"
                if kernel == "embedding":
                    want = p.dequantize()
                elif kernel == "dequantize":
                    want = expected.T
                elif kernel == "cpu x1":
                    want = expected[:1]
                else:
                    want = expected
                tol = 0.15 if kernel == "cpu-a8" else 1e-4
                assert torch.allclose(result, want, rtol=tol, atol=tol), f"{label}: {kernel}"
            counts["accepted" if indices_ok else "refused"] += 1
    print(json.dumps(counts), flush=True)
''')

FORMATS = [(4, 16, False), (3, 32, True), (2, 8, False), (8, 16, True), (4, 32, True)]


def _fuzz(cases: int, seed: int) -> dict:
    tests_dir = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", FUZZ, str(tests_dir), str(cases), str(seed), json.dumps(FORMATS)],
                          capture_output=True, text=True, timeout=900)
    last = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert proc.returncode == 0, (f"fuzzing exited with {proc.returncode} after {last[0]!r}\n"
                                  f"{proc.stderr[-3000:]}")
    return json.loads(last[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_corrupted_packed_tensors_give_a_clear_error_or_the_right_answer(seed):
    counts = _fuzz(cases=60, seed=seed)
    assert counts["cases"] == 60 * len(FORMATS)
    # both outcomes must occur, or the corruptions do not exercise the checks
    assert counts["refused"] > 0.2 * counts["cases"] and counts["accepted"] > 0.1 * counts["cases"], counts


@pytest.mark.skipif(not cpu.available(), reason="native extension not built")
def test_in_place_edits_of_checked_indices_are_checked_again():
    """The kernels' check is cached per tensor version: an index edited after a good call is caught."""
    import torch
    from problems import awkward_packed

    from gqsa.format.packed import FormatError
    from gqsa.nn.packed_linear import PackedLinear
    from gqsa.ops.linear import packed_linear

    p = awkward_packed(4, 16, False)
    x = torch.randn(2, p.in_features)
    packed_linear(x, p, backend="cpu")
    layer = PackedLinear.from_packed(p)
    layer(x)  # binds the fast path
    p.col_indices[1] = 30000  # the same tensor as the layer's buffer: the version counter moves
    with pytest.raises(FormatError, match="col_indices"):
        packed_linear(x, p, backend="cpu")
    with pytest.raises(FormatError, match="col_indices"):
        layer(x)
    with pytest.raises(FormatError, match="col_indices"):
        packed_linear(x, p, backend="reference")
