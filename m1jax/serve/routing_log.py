"""The routing log of one request: per MoE layer, what the router did with this request's tokens only.

    tokens_per_expert (E,)  the router's (token, expert) choices over the request's tokens that ran through the model
                            (its prompt, then every drawn token that was fed back; not its batch neighbours')
    load (E,)               tokens_per_expert / their sum
    entropy                 -sum_e load_e ln load_e (nats): ln E when perfectly even, 0 when one expert takes all
    experts_per_token       expert calls actually computed per token (experts_per_token of the config, fewer when
                            expert_threshold skips low-weight choices)
"""
from __future__ import annotations

import numpy as np

from m1jax.config import M1Config


def routing(job, config: M1Config, expert_threshold: float | None) -> dict:
    counts = np.zeros((config.num_layers, config.num_experts), np.int64) if job.counts is None else job.counts
    calls = counts if job.calls is None else job.calls
    layers = []
    for layer, (kind, row, computed) in enumerate(zip(config.layer_types, counts, calls)):
        total = int(row.sum())
        load = row / max(total, 1)
        nonzero = load[load > 0]
        tokens = total / config.experts_per_token
        layers.append({"layer": layer, "type": kind, "tokens_per_expert": row.tolist(),
                       "load": [round(float(x), 6) for x in load],
                       "entropy": round(float(-(nonzero * np.log(nonzero)).sum()), 6),
                       "experts_per_token": round(float(computed.sum() / tokens), 6) if tokens else 0.0})
    return {"expert_threshold": expert_threshold, "layers": layers}
