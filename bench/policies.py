"""The routing policies `kvrelay bench prefix` compares, as scheduler configs."""

from __future__ import annotations

from gateway.scheduling.config import DEFAULT

POLICIES = {
    "prefix_load": DEFAULT,
    "least_loaded": {
        "profiles": {
            "prefill": {
                "scorers": [
                    {"type": "queue-depth", "weight": 1.0},
                    {"type": "kv-usage", "weight": 1.0},
                    {"type": "inflight-tokens", "weight": 1.0},
                ]
            },
            "decode": DEFAULT["profiles"]["decode"],
        }
    },
    "round_robin": {
        "profiles": {
            "prefill": {"scorers": [], "picker": {"type": "round-robin"}},
            "decode": {"scorers": [], "picker": {"type": "round-robin"}},
        }
    },
}
