"""The router report and its dump: ``<path>.safetensors`` (the routing tensors) + ``<path>.json`` (the report).

The format is ``headlens-router-dump``: per MoE layer ``layer{l}.logits`` (T, E), ``layer{l}.indices`` and
``layer{l}.weights`` (T, k), ``layer{l}.seq`` (T,), the CSR dispatch ``layer{l}.dispatch.{indptr,indices,data,
shape}``, and per pair of consecutive MoE layers ``transitions.{a}_to_{b}`` (E, E); the JSON holds
:meth:`RouterReport.to_json`. :func:`load_dump` reads it back.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from headlens.errors import HeadlensError
from headlens.moe.capture import RouterLayer
from headlens.moe.statistics import LayerStats, Transition, dispatch_csr

_TRANSITION_KEY = re.compile(r"^(\d+)->(\d+)$")  # how the JSON spells a transition: "a->b"


@dataclass
class RouterReport:
    """What a routing run found, as the dump's JSON stores it."""

    model: dict  # name, source (directory), model_type, revision
    rule: str  # the family's scoring rule (see headlens.moe.capture)
    experts: int  # E
    top_k: int  # k experts per token
    moe_layers: list[int]  # layers with a router, in order
    dense_layers: list[int]  # layers without one (skipped)
    tokens: int  # T, real tokens routed over all texts
    prompt_sha256: str  # hash of the texts joined by newlines
    stats: list[LayerStats]  # one per MoE layer, in order
    transitions: list[Transition] = field(default_factory=list)  # one per pair of consecutive MoE layers

    def to_json(self) -> dict:
        """Plain JSON data; transitions as ``{"a->b": (E, E) counts}``."""
        out = asdict(self)
        out["transitions"] = {f"{t.source}->{t.target}": t.counts for t in self.transitions}
        return out

    @classmethod
    def from_json(cls, data: dict) -> "RouterReport":
        """The report :meth:`to_json` wrote."""
        data = dict(data)
        stats = [LayerStats(**s) for s in data.pop("stats")]
        trans = []
        for key, counts in data.pop("transitions", {}).items():
            m = _TRANSITION_KEY.match(key)
            if m is None:
                raise HeadlensError(f"router dump: transition key {key!r} is not '<layer>-><layer>'")
            trans.append(Transition(source=int(m.group(1)), target=int(m.group(2)), counts=counts))
        return cls(stats=stats, transitions=trans, **data)


def prompt_hash(texts: list[str]) -> str:
    """sha256 of the texts joined by newlines (hex)."""
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def write_dump(path: Path, report: RouterReport, layers: list[RouterLayer]) -> tuple[Path, Path]:
    """``<path>.safetensors`` (per-layer logits, indices, weights, CSR dispatch, transitions) + ``<path>.json``;
    returns both paths."""
    from safetensors.torch import save_file

    from headlens.io.files import atomic_path, write_json

    tensors: dict[str, torch.Tensor] = {}
    for r in layers:
        p = f"layer{r.layer}."
        tensors[p + "logits"] = r.logits.float().contiguous()
        tensors[p + "indices"] = r.indices.to(torch.int64).contiguous()
        tensors[p + "weights"] = r.weights.float().contiguous()
        tensors[p + "seq"] = r.seq.to(torch.int64).clone()
        for key, v in dispatch_csr(r, report.experts).items():
            tensors[p + "dispatch." + key] = v.clone()
    for t in report.transitions:
        tensors[f"transitions.{t.source}_to_{t.target}"] = torch.tensor(t.counts, dtype=torch.int64)
    st = Path(str(path) + ".safetensors")
    js = Path(str(path) + ".json")
    with atomic_path(st) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "headlens-router-dump", "rule": report.rule})
    write_json(js, report.to_json())
    return st, js


def load_dump(path: str | Path) -> tuple[RouterReport, list[RouterLayer], dict[str, torch.Tensor]]:
    """Reload a dump written by :func:`write_dump` (``path`` with or without its suffix).

    Returns (the report, one :class:`RouterLayer` per MoE layer, the CSR tensors keyed as stored:
    ``layer{l}.dispatch.{indptr,indices,data,shape}``)."""
    from headlens.io.files import read_json_and_tensors

    meta, tensors = read_json_and_tensors(path, "router dump")
    report = RouterReport.from_json(meta)
    layers = [RouterLayer(layer=l, logits=tensors[f"layer{l}.logits"], indices=tensors[f"layer{l}.indices"],
                          weights=tensors[f"layer{l}.weights"], seq=tensors[f"layer{l}.seq"])
              for l in report.moe_layers]
    dispatch = {k: v for k, v in tensors.items() if ".dispatch." in k}
    return report, layers, dispatch
