"""`dsv4 plan` (issue 23): where a model runs on a machine (accelerators + host RAM) and about how fast, computed on
the meta device (dsv4.weights.plan); `dsv4 plan --train` (issue 24): what training it takes on N GPUs and the layout
to use (dsv4.train.scaling). Registered in dsv4.cli's COMMANDS like the others."""

from dsv4.config import PRESETS


def add_plan(subparsers):
    from dsv4.weights.plan import FORMATS, Formats, Hardware

    hw, fm = Hardware(), Formats()
    p = subparsers.add_parser("plan", help="placement, memory per device and a roofline of tokens/s on a machine",
                              description="Place a model on accelerators and host RAM (routed experts on the CPU "
                              "when it does not fit, the llama.cpp / ktransformers split), print the memory per "
                              "device, the device map and a roofline estimate of prefill and decode tokens/s. "
                              "Exits 2 with the reason when nothing fits.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=list(PRESETS), help="a named configuration (v4-flash, v4-pro, ...)")
    source.add_argument("--ckpt", metavar="DIR", help="a checkpoint directory (its config.json)")
    p.add_argument("--devices", default="1x24GB", help="accelerators: 2x24GB, 24GB,16GB, none, or auto (this "
                   "machine's, their free memory) (default: %(default)s)")
    p.add_argument("--ram", default="256GB", help="host memory, or auto (this machine's available RAM) "
                   "(default: %(default)s)")
    p.add_argument("--context", default="128K", help="tokens per sequence: 4096, 128K, 1M (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens (default: %(default)s)")
    p.add_argument("--experts", default=None, choices=FORMATS,
                   help=f"routed experts' format (default: a `dsv4 quantize`d checkpoint's, else the release's, "
                        f"{fm.experts})")
    p.add_argument("--weights", default=None, choices=FORMATS,
                   help=f"other linear weights' format (default: a `dsv4 quantize`d checkpoint's, else {fm.weights})")
    p.add_argument("--embed", default=fm.embed, choices=FORMATS, help="embedding and head (default: %(default)s)")
    p.add_argument("--cache-dtype", default=fm.cache, choices=("bf16", "fp16", "fp32"), help="KV cache dtype")
    p.add_argument("--group", type=int, default=None, help=f"int4: inputs per scale (default: {fm.group})")
    g = p.add_argument_group("roofline inputs (defaults: an RTX 4090-class card, a DDR5 host, PCIe 4.0 x16)")
    g.add_argument("--gpu-bandwidth", type=float, default=hw.gpu_bandwidth / 1e9, metavar="GB/s")
    g.add_argument("--gpu-flops", type=float, default=hw.gpu_flops / 1e12, metavar="TFLOP/s")
    g.add_argument("--cpu-bandwidth", type=float, default=hw.cpu_bandwidth / 1e9, metavar="GB/s")
    g.add_argument("--cpu-flops", type=float, default=hw.cpu_flops / 1e12, metavar="TFLOP/s")
    g.add_argument("--pcie", type=float, default=hw.pcie_bandwidth / 1e9, metavar="GB/s")
    g.add_argument("--pcie-latency", type=float, default=hw.pcie_latency * 1e6, metavar="us", help="per transfer")
    g.add_argument("--headroom", default=None, help="kept free per accelerator (default: one prefill chunk's "
                   "working set + 1 GB)")
    g.add_argument("--ram-headroom", default="8GB", help="kept free in host RAM (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON (its device_map is what --device-map takes)")
    g = p.add_argument_group("training (--train: memory and traffic per GPU of FSDP2 + expert parallelism, and the "
                             "layout to use; docs/scaling.md)")
    g.add_argument("--train", action="store_true", help="plan training instead of inference placement")
    g.add_argument("--gpus", default="8,64,512", help="GPU counts to plan for (default: %(default)s)")
    g.add_argument("--gpu-memory", default="80GB", help="memory per GPU (default: %(default)s)")
    g.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence (default: %(default)s)")
    g.add_argument("--seqs-per-gpu", type=int, default=1, help="sequences per GPU per step (default: %(default)s)")
    p.set_defaults(run=run_plan)


def run_plan(opts) -> int:
    from dsv4.config import ModelArgs
    from dsv4.weights.plan import Formats, Hardware, format_plan, local_memory, parse_devices, parse_size, plan

    fm, raw = Formats(), {}
    if opts.model:
        args, name = ModelArgs.from_name(opts.model), opts.model
    else:
        from dsv4.weights.checkpoint import read_config

        (args, raw), name = read_config(opts.ckpt), opts.ckpt
    if opts.train:
        return run_train_plan(opts, args, name)
    quantized = raw.get("quantization_config") or {}
    if quantized.get("quant_method") == "dsv4":  # `dsv4 quantize` wrote it: its layers stay in its format
        fm = Formats(quantized["format"], quantized["format"], group=quantized.get("group_size", fm.group))
    cards, ram = local_memory() if "auto" in (opts.devices, opts.ram) else ([], 0)
    hardware = Hardware(cards if opts.devices == "auto" else parse_devices(opts.devices),
                        ram if opts.ram == "auto" else parse_size(opts.ram), gpu_bandwidth=opts.gpu_bandwidth * 1e9,
                        gpu_flops=opts.gpu_flops * 1e12, cpu_bandwidth=opts.cpu_bandwidth * 1e9,
                        cpu_flops=opts.cpu_flops * 1e12, pcie_bandwidth=opts.pcie * 1e9,
                        pcie_latency=opts.pcie_latency * 1e-6,
                        headroom=None if opts.headroom is None else parse_size(opts.headroom),
                        ram_headroom=parse_size(opts.ram_headroom))
    formats = Formats(opts.experts or fm.experts, opts.weights or fm.weights, opts.embed, opts.cache_dtype,
                      opts.group if opts.group is not None else fm.group)
    result = plan(args, hardware, opts.context, opts.batch, formats, opts.chunk, name)
    print(result.to_json() if opts.json else format_plan(result))
    return 0


def run_train_plan(opts, args, name: str) -> int:
    from dsv4.train.scaling import format_train_plan, to_json, train_plan
    from dsv4.weights.plan import parse_size

    try:
        gpus = [int(n) for n in opts.gpus.split(",")]
    except ValueError:
        raise ValueError(f"--gpus takes GPU counts separated by commas (8,64,512), got {opts.gpus!r}") from None
    if not gpus or min(gpus) < 1:
        raise ValueError(f"--gpus needs positive counts, got {opts.gpus!r}")
    result = train_plan(args, name, gpus, opts.seqs_per_gpu, opts.seq_len, parse_size(opts.gpu_memory))
    print(to_json(result) if opts.json else format_train_plan(result))
    return 0
