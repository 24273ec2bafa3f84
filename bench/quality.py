"""How much a weight format changes a model's predictions: top-1 agreement and KL divergence of
its next-token distributions against a reference, over real English text (the documentation of
Python's standard library, which ships with every interpreter, so the measure needs no download)."""

from __future__ import annotations

import inspect
import json
import textwrap

import torch
import torch.nn.functional as F

_MODULES = (json, textwrap, inspect, F, torch.nn.Module)


def real_text() -> str:
    import argparse
    import collections
    import functools
    import logging
    import pathlib
    import subprocess

    docs = [inspect.getdoc(m) or "" for m in (*_MODULES, argparse, collections, functools, logging, pathlib)]
    docs += [inspect.getdoc(subprocess.run) or "", inspect.getdoc(subprocess.Popen) or ""]
    return "\n\n".join(d for d in docs if d)


def windows(tokens: list[int], positions: int, window: int = 512) -> list[list[int]]:
    """Consecutive windows of the text covering at least `positions` positions."""
    need = -(-positions // window)
    if len(tokens) < need * window:
        raise ValueError(f"the text has {len(tokens)} tokens, {need * window} are needed")
    return [tokens[i * window : (i + 1) * window] for i in range(need)]


def compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[int, float, float]:
    """(positions, positions where the argmax agrees, summed KL(ref || got)) of [N, vocab] logits."""
    agree = (got.argmax(-1) == ref.argmax(-1)).sum().item()
    kl = F.kl_div(got.float().log_softmax(-1), ref.float().log_softmax(-1), log_target=True, reduction="sum").item()
    return got.shape[0], agree, kl
