"""scripts/count_step_ops.py: its count of a program's device operations, on a hand-written HLO module, and a smoke
run on a tiny random engine."""

from scripts.count_step_ops import count, count_hlo

HLO = """HloModule step

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused
  %c = f32[4]{0} copy(%f)
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %c)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%zero, %a)
  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %out = f32[4]{0} get-tuple-element(%w), index=1
  ROOT %s = f32[4]{0} sort(%out), dimensions={0}, to_apply=%less
}
"""


def test_counts_device_ops_per_loop_body_and_per_step():
    counts = count_hlo(HLO)
    assert counts["entry"] == 1  # the sort; parameters, constants, tuples and the loop itself make no work
    (loop,) = counts["loops"]
    assert (loop["trip_count"], loop["ops"], loop["by_opcode"]) == (3, 2, {"fusion": 1, "copy": 1})
    assert loop["copies"] == ["f32[4]{0}"]
    assert counts["per_step"] == 1 + 3 * 2


def test_smoke_on_a_tiny_engine():
    row = count("deepseek-v2-lite", 3, "resident", "cuda")
    assert row["layers"] == 3 and row["moe_layers"] == 2
    assert row["hlo_ops_per_layer"] > 10 and row["hlo_per_step"] > 2 * row["hlo_ops_per_layer"]
    assert row["stablehlo_cuda_module"] > row["hlo_ops_per_layer"]
    (layers,) = [loop for loop in row["hlo_loops"] if loop["trip_count"] == 2]  # the MoE layers' scan
    assert all(shape.startswith("s32[]") for shape in layers["copies"])  # no KV cache copied at each layer
