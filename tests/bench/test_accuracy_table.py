"""The accuracy table's row definitions: every row resolves to a valid config, and a "+bqpo+e2e" row is measured
in two stages whose first stage is exactly its "+bqpo" row."""

import importlib.util
from pathlib import Path

import pytest

from gqsa.config import E2ESpec

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy_table.py"
_spec = importlib.util.spec_from_file_location("accuracy_table", _PATH)
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


@pytest.mark.parametrize("row", list(table.ROWS))
def test_every_row_resolves(row):
    cfg = table.resolve(row, 8, 64)
    assert (cfg is None) == (row == "dense")
    if cfg is not None:
        assert (cfg.calib.samples, cfg.calib.seq_len) == (8, 64)
        assert ("+bqpo" in row) == (cfg.bqpo.epochs > 0)
        assert ("+e2e" in row) == (cfg.e2e.epochs > 0)


def test_two_stage_rows_share_everything_but_e2e():
    two_stage = [r for r in table.ROWS if r.endswith("+e2e")]
    assert two_stage
    for row in two_stage:
        first, last = table._stages(row)
        assert last == row and first == row[: -len("+e2e")]
        assert table.resolve(first, 8, 64) == table.resolve(row, 8, 64).replace(e2e=E2ESpec())
    assert table._stages("w4s50-g16") == ["w4s50-g16"]


def test_render_orders_rows_and_formats_numbers():
    data = {"settings": {"datasets": ["wiki"]}, "rows": {
        "w4s50-g16": {"section": "GQSA one-shot", "bits_per_weight": 2.5, "sparsity": 0.5, "ppl_wiki": 2251.4},
        "dense": {"section": "reference", "ppl_wiki": 11.334},
    }}
    lines = [line for line in table.render(data).splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert lines[0].startswith("| reference | dense | 32 (fp32)") and "11.33" in lines[0]
    assert "| w4s50-g16 | 2.50 | 50.0% | 2,251 |" in lines[1]


def test_ablation_rows_exist_and_render():
    for stages in table.ABLATION.values():
        assert all(r is None or r in table.ROWS for r in stages)
    data = {"settings": {"datasets": ["wiki", "c4"]}, "rows": {
        "w4s50-g16": {"bits_per_weight": 3.17, "ppl_wiki": 2251.0, "ppl_c4": 3999.0, "compress_cpu_s": 300},
        "w4s50-g16+bqpo": {"bits_per_weight": 3.17, "ppl_wiki": 90.5, "ppl_c4": 150.25, "compress_cpu_s": 1200},
    }}
    line = next(x for x in table.render_ablation(data).splitlines() if x.startswith("| GQSA W4S50"))
    assert line == "| GQSA W4S50 g16 | 3.17 | 2,251 / 3,999 (5 min) | 90.50 / 150.25 (20 min) | not measured |"
    assert "| SparseGPT 2:4 (fp16) | - | not measured | not measured | n/a |" in table.render_ablation(data)


def test_gptq_rows_are_their_presets_with_the_group_size_changed():
    from gqsa.presets import preset

    for b in (2, 3, 4):
        cfg = table.resolve(f"gptq-w{b}g32", 8, 64)
        assert cfg.quant.bits == b and cfg.quant.group_size == 32
        assert cfg.oneshot == preset(f"w{b}g64").oneshot  # static qparams at 2 bits only
    assert table.resolve("gptq-w2g32-dynamic", 8, 64).oneshot.static_qparams is False
