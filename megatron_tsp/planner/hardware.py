"""Hardware profiles: `configs/hardware/<name>.yaml`, the device rates the planner uses.

Each section carries a `source:` line saying how its numbers were obtained (measured by
`benchmarks/measure_hardware.py`, derived from a profile, or read from notes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import yaml

from .errors import PlanError

HARDWARE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "hardware")
COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce", "send_recv")
# host <-> GPU copy bandwidth (pinned memory, one direction) when a profile has no `host.copy_gb_s`:
# an H200's PCIe 5 x16 link carries ~55 GB/s per direction at best; assumed, not measured
DEFAULT_HOST_GB_S = 50.0


@dataclass
class Hardware:
    name: str
    gpus_per_node: int
    gpu_memory_gib: float
    matmul_tflops: float
    attention_tflops: Dict[str, float]  # kernel family -> TFLOP/s
    hbm_tb_s: float
    elementwise_efficiency: float
    links: Dict[str, Dict[str, float]]  # intra / inter -> collective -> bus GB/s
    raw: dict
    host_gb_s: float = DEFAULT_HOST_GB_S  # pinned host <-> GPU copies (activation offload), one direction
    host_memory_gib: Optional[float] = None  # host memory per node for offloaded activations; None: unchecked

    def bus_gb_s(self, collective: str, link: str) -> float:
        table = self.links.get(link)
        if not table:
            raise PlanError(f"hardware profile {self.name!r} has no {link}-node link bandwidths "
                            f"(links.{link}_node); a layout crossing nodes needs them")
        if collective == "all_to_all" and collective not in table and "all_gather" in table:
            # profiles measured before MoE have no all-to-all: NCCL's all-to-all and all-gather
            # move the same bytes per rank over the same links (docs/planner.md, an assumption)
            collective = "all_gather"
        if collective not in table:
            raise PlanError(f"hardware profile {self.name!r}: links.{link}_node has no {collective}_gb_s")
        return table[collective]

    def attention(self, family: str) -> float:
        if family not in self.attention_tflops:
            raise PlanError(f"hardware profile {self.name!r}: attention has no {family}_tflops")
        return self.attention_tflops[family]


def available() -> list:
    return sorted(f[:-5] for f in os.listdir(HARDWARE_DIR) if f.endswith(".yaml"))


def _num(data: dict, key: str, where: str, required=True) -> Optional[float]:
    v = data.get(key)
    if v is None:
        if required:
            raise PlanError(f"hardware profile {where}: missing {key}")
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise PlanError(f"hardware profile {where}: {key} must be a positive number, got {v!r}")
    return float(v)


def load(name_or_path: str) -> Hardware:
    """A profile by name (configs/hardware/NAME.yaml) or by path."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(HARDWARE_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        raise PlanError(f"--hardware {name_or_path!r}: no such profile; available: {', '.join(available())} "
                        f"(or a path to a YAML profile)")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    where = os.path.basename(path)
    for section in ("matmul", "attention", "memory", "links"):
        if not isinstance(data.get(section), dict):
            raise PlanError(f"hardware profile {where}: missing section {section!r}")
    links = {}
    for link in ("intra", "inter"):
        table = data["links"].get(f"{link}_node")
        if table:
            links[link] = {c: _num(table, f"{c}_gb_s", f"{where} links.{link}_node") for c in COLLECTIVES}
    if "intra" not in links:
        raise PlanError(f"hardware profile {where}: links.intra_node is required")
    attn = {k[: -len("_tflops")]: _num(data["attention"], k, f"{where} attention")
            for k in data["attention"] if k.endswith("_tflops")}
    for fam in ("square_causal", "rect_lower_right"):
        if fam not in attn:
            raise PlanError(f"hardware profile {where}: attention.{fam}_tflops is required")
    return Hardware(
        name=data.get("name", where[:-5]),
        gpus_per_node=int(_num(data, "gpus_per_node", where)),
        gpu_memory_gib=_num(data, "gpu_memory_gib", where),
        matmul_tflops=_num(data["matmul"], "bf16_tflops", f"{where} matmul"),
        attention_tflops=attn,
        hbm_tb_s=_num(data["memory"], "hbm_tb_s", f"{where} memory"),
        elementwise_efficiency=_num(data["memory"], "elementwise_efficiency", f"{where} memory"),
        links=links,
        raw=data,
        host_gb_s=(_num(data["host"], "copy_gb_s", f"{where} host", required=False) or DEFAULT_HOST_GB_S)
        if isinstance(data.get("host"), dict) else DEFAULT_HOST_GB_S,
        host_memory_gib=_num(data["host"], "memory_gib", f"{where} host", required=False)
        if isinstance(data.get("host"), dict) else None,
    )
