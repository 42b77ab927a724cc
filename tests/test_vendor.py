"""Hardware independence: only dsv4/device.py names a vendor's device. Every other module in dsv4/ and bench/ takes
a torch.device from its caller and asks dsv4.device about it, so a new accelerator is one row of `device.KINDS`.

The scan reads the syntax tree, not the text: prose in docstrings and comments may say CUDA; code may not say
"cuda", torch.cuda, x.cuda(), import torch_npu, "nccl", ..."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("dsv4", "bench")
ALLOWED = {Path("dsv4/device.py")}

DEVICE_TYPES = ("cuda", "mps", "xpu", "npu", "mlu", "hpu")
# a whole string constant (or an f-string's literal part) that is a device type with an optional index, a vendor
# plugin's module name, or a vendor's collective-communication backend
VENDOR_STRING = re.compile(rf"^(?:(?:{'|'.join(DEVICE_TYPES)})(?::\d*)?|torch_(?:npu|mlu)(?:\..*)?"
                           r"|nccl|rccl|xccl|hccl|cncl)$")
# attributes: torch.cuda, torch.backends.mps, torch.backends.cudnn, torch.version.hip, x.cuda(), t.is_cuda, ...
VENDOR_ATTRS = {*DEVICE_TYPES, *(f"is_{t}" for t in DEVICE_TYPES), "cudnn", "hip"}
VENDOR_MODULES = {"torch_npu", "torch_mlu"}


def vendor_names(source: str, filename: str = "<snippet>") -> list[str]:
    """'file:line: what' for each place the source names a vendor device."""
    found = []

    def hit(node: ast.AST, what: str):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and VENDOR_STRING.match(node.value):
            hit(node, f"string {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in VENDOR_ATTRS:
            hit(node, f"attribute .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in VENDOR_MODULES:
            hit(node, f"name {node.id}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in VENDOR_MODULES or (parts[0] == "torch" and VENDOR_ATTRS & set(parts[1:])):
                    hit(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            names = {alias.name for alias in node.names}
            if parts[0] in VENDOR_MODULES or (parts[0] == "torch" and VENDOR_ATTRS & (set(parts[1:]) | names)):
                hit(node, f"from {node.module} import {', '.join(sorted(names))}")
    return found


def scanned_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if p.relative_to(ROOT) not in ALLOWED)


def test_only_the_device_module_names_vendor_devices():
    files = scanned_files()
    assert len(files) > 50 and ROOT / "dsv4/model/transformer.py" in files  # the scan reaches the whole package
    found = [line for p in files for line in vendor_names(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, "device decisions belong in dsv4/device.py:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    'x.to("cuda")',
    'torch.device("cuda:1")',
    'torch.device("cuda", 1)',
    'f"cuda:{rank}"',
    'device.type == "mps"',
    'if kind in ("cpu", "xpu"): pass',
    'torch.device("npu:0")',
    'torch.device("mlu")',
    'torch.device("hpu")',
    'torch.cuda.synchronize()',
    'torch.mps.empty_cache()',
    'torch.xpu.is_available()',
    'torch.npu.set_device(0)',
    'torch.mlu.device_count()',
    'torch.backends.mps.is_available()',
    'torch.backends.cuda.matmul.allow_tf32 = True',
    'torch.backends.cudnn.benchmark = True',
    'hip = torch.version.hip',
    'model.cuda()',
    'x = t.is_cuda',
    'import torch_npu',
    'import torch_mlu.utils',
    'from torch_npu.contrib import transfer_to_npu',
    'torch_mlu.something()',
    'importlib.import_module("torch_npu")',
    'import torch.cuda.amp',
    'from torch import cuda',
    'from torch.cuda import amp',
    'dist.init_process_group("nccl")',
    'dist.init_process_group(backend="hccl")',
])
def test_the_scan_catches(snippet):
    assert vendor_names(snippet), f"missed: {snippet}"


def test_the_scan_names_file_and_line():
    assert vendor_names('import torch\n\nx = torch.zeros(1).cuda()\n', "m.py") == ["m.py:3: attribute .cuda"]


@pytest.mark.parametrize("snippet", [
    '"""Runs on CUDA, ROCm, Ascend (npu) and Cambricon (mlu); see torch.cuda for details."""',
    '# torch.cuda.synchronize() is in dsv4.device\nx = 1',
    'torch.device("cpu")',
    'torch.device("meta")',
    'x.device.type != "meta"',
    'help = "cpu, cuda, cuda:1, mps, ..."',  # prose in a string, not a device
    'from dsv4.device import synchronize, distributed_backend',
    'cudas = "cudaMalloc"',
    'x = ("mps_like", "npu0x")',
])
def test_the_scan_leaves_prose_and_neutral_code_alone(snippet):
    assert vendor_names(snippet) == []
