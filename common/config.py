"""Typed engine settings. Services nest this in their own settings object."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator


class EngineConfig(BaseModel):
    model: str | None = Field(None, description="GGUF file or safetensors directory; default: SmolLM2-135M")
    device: str = "cpu"
    dtype: str = Field("auto", description="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16")
    block_size: int = Field(16, gt=0, le=256)
    kv_cache_mb: int = Field(384, gt=0, description="memory for the paged KV cache")
    num_kv_blocks: int | None = Field(None, gt=0, description="overrides kv_cache_mb when set")
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int = Field(256, gt=0, description="token budget of one engine step")
    max_model_len: int | None = Field(None, gt=0, description="context window; default: the model's, at most 8192")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads; default: torch's choice")
    lease_seconds: float = Field(10.0, gt=0, description="how long prefill pins KV blocks awaiting a pull")
    quantization: Literal["auto", "none", "fp16", "int8"] = Field(
        "auto",
        description="weights as served: none (the compute dtype); on CPU fp16 (half the bytes, same answers) or "
        "int8 (a quarter, lossy on small models: measure it); auto: fp16 on CPU for a quantized GGUF file, none "
        "otherwise. The KV cache keeps the compute dtype",
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        allowed = ("auto", "float32", "float16", "bfloat16")
        if v not in allowed:
            raise ValueError(f"dtype must be one of {allowed}, got {v!r}")
        return v

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"
