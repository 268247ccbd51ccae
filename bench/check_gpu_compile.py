"""Check, on a machine without a GPU, that ``torch.compile`` can build the compiled training step
for a CUDA GPU (Hopper, sm_90): the step of ``bench_step.py``'s ``ours_compile`` variant (what
``--run.compile=true`` trains with), forward and backward, through inductor's CUDA backend down
to compiled Triton kernels.

A GPU is lent only now and then; a compile failure found there costs that GPU time. This finds
such failures on any machine:

1. The step runs on the CPU as on a GPU (bf16 autocast, half weights, the kernels as
   custom ops) with a backend that records dynamo's graphs of the student, decoder and teacher.
   The kernels' bodies are replaced by their fake implementations (outputs of the right shape):
   the graphs depend on shapes only, so no Triton interpreter runs.
2. An sm_90 GPU is then pretended (device properties, Triton's driver and target) and each
   graph goes through inductor: AOT autograd splits it into forward and backward on the CPU,
   each part is moved to CUDA and lowered, scheduled and generated, and every Triton kernel it
   generates is compiled to a cubin (never loaded: nothing runs).

    python bench/check_gpu_compile.py --preset base --stage 2      # ViT-B, ~2 min on 2 cores

Exit status 1 when a graph fails, with its traceback. What it cannot see: failures while a
kernel runs or is tuned on the card, and inductor's choices that depend on benchmarking there
(matmul padding is switched off). Graphs are traced with the CPU's strides, so a graph whose
layout differs by device (aten convolutions: the ``compile`` variant's decoder) may fail here
and not on a GPU; ours has none. It drives private torch and Triton internals (checked with
torch 2.11 / Triton 3.6 and torch 2.14 / Triton 3.8).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import types
from pathlib import Path

# Inductor's own Triton kernels must be real JIT functions: Triton decides at decoration time.
os.environ["TRITON_INTERPRET"] = "0"
import torch  # noqa: E402
import torch._inductor.runtime.triton_helpers  # noqa: E402,F401
import triton.language.extra.libdevice  # noqa: E402,F401

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sslam.kernels  # noqa: E402,F401  (registers the custom ops)

HOPPER = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, total_memory=80 * 2**30,
    max_threads_per_multi_processor=2048, warp_size=32, regs_per_multiprocessor=65536,
    shared_memory_per_block=49152, shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472, max_threads_per_block=1024, L2_cache_size=50 * 2**20,
    gcnArchName="", uuid="0", is_integrated=False, clock_rate=1980000, memory_clock_rate=2619000,
    memory_bus_width=5120)
COMPILED_KERNELS: list[str] = []  # the names of the Triton kernels compiled so far


def fake_kernel_bodies() -> None:
    """Each ``sslam::`` custom op computes its fake implementation on CPU tensors."""
    from torch._library.custom_ops import OPDEFS

    for name, op in OPDEFS.items():
        if name.startswith("sslam::") and op._abstract_fn is not None:
            op.register_kernel("cpu")(op._abstract_fn)


def capture_graphs(preset_name: str, stage: int, batch: int, steps: int) -> list:
    """Dynamo's graphs (``torch.fx.GraphModule``) of ``steps`` compiled training steps of ours."""
    from bench_step import Step

    from sslam.train_config import preset

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # SSLAM_KERNELS=1 accepts CPU tensors only with the interpreter chosen, and chosen before the
    # kernels were defined; nothing is launched (the ops' CPU kernels are their fake ones).
    from sslam.kernels import switch

    os.environ["TRITON_INTERPRET"], switch._INTERPRETING_AT_IMPORT = "1", True
    step = Step("ours", preset(preset_name, stage), batch, torch.device("cpu"), gpu_path=True)
    step.model.compile_networks(backend=record)
    for _ in range(steps):
        step()
    os.environ["TRITON_INTERPRET"], switch._INTERPRETING_AT_IMPORT = "0", False
    return graphs


def pretend_hopper_gpu() -> None:
    """Make torch, inductor and Triton see one sm_90 GPU that compiles but never runs."""
    import torch._dynamo.device_interface as device_interface
    import torch._functorch.config as functorch_config
    import torch._inductor.async_compile as async_compile
    import torch._inductor.fx_passes.fuse_attention as fuse_attention
    import torch._inductor.runtime.triton_helpers as triton_helpers
    import torch._inductor.scheduler as scheduler
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.utils._triton as torch_triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime import driver

    class Device:  # torch.cuda.device(i) as a context manager that does nothing
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def nothing(*args, **kwargs):
        return None

    cuda = torch.cuda
    cuda.is_available, cuda.device_count, cuda.current_device = (lambda: True), (lambda: 1), (lambda: 0)
    cuda.get_device_properties = lambda *a, **k: HOPPER
    cuda.get_device_capability = lambda *a, **k: (HOPPER.major, HOPPER.minor)
    cuda.get_device_name = lambda *a, **k: HOPPER.name
    cuda.is_bf16_supported = lambda *a, **k: True
    cuda._lazy_init = cuda.set_device = cuda.set_rng_state = cuda.random.set_rng_state = nothing
    cuda.get_rng_state = cuda.random.get_rng_state = lambda *a, **k: torch.zeros(16, dtype=torch.uint8)
    cuda.device = Device
    interface = device_interface.CudaInterface
    for name in ("get_device_properties", "current_device", "set_device", "device_count", "is_bf16_supported"):
        setattr(interface, name, staticmethod(getattr(cuda, name)))
    interface.device = Device
    interface.Worker.get_device_properties = staticmethod(lambda *a, **k: HOPPER)
    interface.memory_allocated = staticmethod(lambda *a, **k: 0)
    interface.synchronize = staticmethod(nothing)
    interface.get_raw_stream = staticmethod(lambda *a, **k: 0)
    if hasattr(fake_tensor, "init_gpu_context"):
        fake_tensor.init_gpu_context = nothing
    fuse_attention._sfdp_init = nothing  # builds its patterns on real CUDA tensors
    torch._inductor.config.shape_padding = False  # decides by timing matmuls on the card
    torch._inductor.config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False
    functorch_config.force_non_lazy_backward_lowering = True  # the backward now, not at its first run

    target = GPUTarget("cuda", HOPPER.major * 10 + HOPPER.minor, HOPPER.warp_size)

    class Driver:
        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, *args):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def is_active(self):
            return True

    driver.set_active(Driver())
    torch_triton.has_triton = scheduler.has_triton = lambda: True
    torch_triton.triton_backend = lambda: CUDABackend(target)
    torch_triton.triton_hash_with_backend = lambda: f"pretended-{target.arch}"
    triton_helpers.set_driver_to_gpu = nothing

    def compile_only(self, kernel_name, source_code, *args, **kwargs):
        kernel = async_compile._load_triton_kernel_from_source(kernel_name, source_code)
        kernel.precompile(warm_cache_only=True)  # to a cubin, never loaded
        COMPILED_KERNELS.append(kernel_name)
        return kernel

    async_compile.AsyncCompile.triton = compile_only


def on_cuda(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with every CPU device argument made ``cuda:0``."""
    def move(arg):
        if isinstance(arg, torch.device) and arg.type == "cpu":
            return torch.device("cuda", 0)
        return "cuda" if isinstance(arg, str) and arg == "cpu" else arg

    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, move)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, move)
    gm.recompile()
    return gm


def lower_for_cuda(gm: torch.fx.GraphModule) -> list[str]:
    """Run dynamo's graph ``gm`` through inductor for the pretended GPU; the parts lowered
    ("forward", "backward")."""
    import torch._inductor.compile_fx as compile_fx
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    parts = []

    def lower_on_cuda(part, example_inputs, **kwargs):
        part = on_cuda(part)
        mode = detect_fake_mode(example_inputs)
        with mode:
            inputs = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda")
                      if isinstance(x, torch.Tensor) else x for x in example_inputs]
        FakeTensorProp(part, mode).propagate_dont_convert_inputs(*inputs)
        compiled = compile_fx.compile_fx_inner(part, inputs, **kwargs)
        parts.append("backward" if kwargs.get("is_backward") else "forward")
        return compiled

    inputs = [node.meta["example_value"] for node in gm.graph.nodes if node.op == "placeholder"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the step ran: AOT traces under it
        compile_fx.compile_fx(gm, inputs, inner_compile=lower_on_cuda)
    return parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--stage", type=int, choices=(1, 2), default=2)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--steps", type=int, default=2, help="steps captured (a second one shows recompiles)")
    args = p.parse_args()
    if torch.cuda.is_available():
        p.error("a GPU is present: run bench_step.py there instead")

    fake_kernel_bodies()
    graphs = capture_graphs(args.preset, args.stage, args.batch, args.steps)
    print(f"ours_compile, {args.preset}, stage {args.stage}, {args.batch} clips: {len(graphs)} graphs "
          f"in {args.steps} steps; torch {torch.__version__}", flush=True)
    torch.compile(torch.sin)(torch.zeros(1))  # inductor's lazy set-up, while the CPU is itself
    pretend_hopper_gpu()
    failed = 0
    for i, gm in enumerate(graphs):
        symbolic = [n.name for n in gm.graph.nodes
                    if n.op == "placeholder" and not isinstance(n.meta["example_value"], torch.Tensor)]
        before = len(COMPILED_KERNELS)
        try:
            parts = lower_for_cuda(gm)
            print(f"graph {i}: {' + '.join(parts)} lowered, {len(COMPILED_KERNELS) - before} Triton kernels "
                  f"compiled for sm_90" + (f"; symbolic inputs {symbolic}" if symbolic else ""), flush=True)
        except Exception as exc:  # every graph is tried; the first error of each is shown
            failed += 1
            print(f"graph {i}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  flush=True)
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
