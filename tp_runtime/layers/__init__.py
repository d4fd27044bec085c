"""The tensor-parallel layers: column/row-parallel linear (plain and FP8) and the attention layers."""
