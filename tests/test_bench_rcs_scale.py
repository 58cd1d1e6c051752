"""benchmarks/bench_rcs_scale.py runs end to end at a toy size (so that it cannot rot): the
projection pass, the picks over the pool and over a chunk, the round's own greedy loop, and the
extrapolated totals, with the chunk shares adding up to the budget."""

import pytest

from benchmarks.bench_rcs_scale import main
from fastacl import ops

pytestmark = pytest.mark.usefixtures("one_thread")  # the CPU is shared


def test_scale_benchmark_runs_at_a_toy_size(capsys):
    if ops.extension_status()["state"] == "unavailable":
        pytest.skip("the C++ extension is unavailable: " + ops.extension_status()["detail"])
    result = main(["--images", "1000", "--batch-size", "32", "--chunk-batches", "4",
                   "--picks", "3", "--head-width", "16", "--max-gb", "1"])
    out = capsys.readouterr().out
    assert result["D"] == 3 * 16 + 1 and result["budget"] == 50  # round(0.05 x 1000)
    assert result["minibatches"] == 32 and result["chunks"] == 8  # 31 x 32 + 8 images
    assert sum(result["chunk_shares"]) == result["budget"]
    assert set(result["pool"]) == {"fp32", "bf16"}
    assert result["pool"]["fp32"]["bytes"] == 1000 * 49 * 4
    assert result["pool"]["bf16"]["bytes"] == 1000 * 49 * 2
    assert result["pool"]["fp32"]["picks"]["count"] == 3
    assert result["chunk"]["greedy_seconds_per_pick"] > 0
    assert "| `greedy_pick` over N = 1,000 rows" in out and "H200 (4.80 TB/s)" in out
