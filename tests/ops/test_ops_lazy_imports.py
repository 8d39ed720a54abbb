"""`import gqsa` (and packing a layer) pulls in neither Triton nor a native extension, and starts no GPU.

Runs in a fresh interpreter. Stand-in `triton` and `gqsa_native` modules are put on the path, so an eager
`import triton` / `import gqsa_native` would succeed and be seen even on a machine without them.
The op itself is not run here: its first call imports torch._dynamo, which imports any importable triton itself.
"""

import json
import os
import subprocess
import sys
import textwrap

import gqsa

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import gqsa
    import gqsa.config, gqsa.quant, gqsa.format, gqsa.ops, gqsa.nn
    import torch
    from gqsa.format import quantize_to_packed
    from gqsa.nn import PackedLinear

    packed = quantize_to_packed(torch.randn(4, 32), torch.ones(4, 2, dtype=torch.bool), 4, 16)
    PackedLinear.from_packed(packed)

    def native(name):
        top, *rest = name.split(".")
        if top in ("triton", "gqsa_native") or top.startswith("gqsa_C"):
            return True
        return top == "gqsa" and any(p == "_C" or "native" in p or p.startswith("_ext") for p in rest)

    loaded = sorted(m for m in sys.modules if native(m))
    cuda_initialized = torch.cuda.is_initialized()
    import triton, gqsa_native  # control: the stand-ins are importable, so an eager import would have shown
    print(json.dumps({
        "loaded": loaded,
        "cuda_initialized": cuda_initialized,
        "gqsa_file": gqsa.__file__,
        "stand_ins_seen": native(triton.__name__) and native(gqsa_native.__name__),
    }))
    """
)


def test_import_gqsa_loads_no_triton_no_native_extension_and_no_cuda(tmp_path):
    fake = tmp_path / "fake_site"
    (fake / "triton").mkdir(parents=True)
    (fake / "triton" / "__init__.py").write_text("__version__ = '0.0.0'\n")
    (fake / "gqsa_native.py").write_text("")
    (fake / "gqsa_C.py").write_text("")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(fake), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["cuda_initialized"] is False
    assert report["gqsa_file"] == gqsa.__file__  # the subprocess tested this checkout
    assert report["stand_ins_seen"] is True

