"""What phase 2 costs: one exported model scored as exported, without the probes, and in full precision.

    AR_PHASE=eval AR_DATA_DIR=DATA python bench/eval_cost.py MODEL.pt2 [--repeat 3]

Prints the seconds of `evaluate.evaluate` (load, purity check, scoring, probes, the
repeat check), val_bpb and the probes' largest change for: the model as exported (on
the GPU under bf16 autocast, prepare.EXPORT_AUTOCAST), the same without probe batches,
and the same graph and weights with its autocast regions switched off (float32, TF32
matmuls), which is how phase 2 ran models before they were exported under autocast.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evaluate  # noqa: E402
import prepare  # noqa: E402
import torch  # noqa: E402


def full_precision_copy(model: Path, out: Path) -> Path:
    """The exported program with every autocast region disabled (and the dtype checks it traced removed)."""
    program = torch.export.load(model)
    for graph_module in program.graph_module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in list(graph_module.graph.nodes):
            if node.target is torch.ops.higher_order.wrap_with_autocast:
                node.args = (node.args[0], node.args[1], False, *node.args[3:])
            elif node.target is torch.ops.aten._assert_tensor_metadata.default:
                graph_module.graph.erase_node(node)
        graph_module.recompile()
    torch.export.save(program, out)
    return out


def measure(model: Path, probes_per_batch: int, repeat: int) -> tuple[float, dict]:
    evaluate.PROBES_PER_BATCH = probes_per_batch
    seconds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = evaluate.evaluate(model)
        if prepare.DEVICE.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    probes = evaluate.PROBES_PER_BATCH
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("as exported", args.model, probes), ("as exported, no probes", args.model, 0),
                    ("autocast off (fp32/TF32)", full_precision_copy(args.model, Path(tmp) / "fp32.pt2"), probes)]
        for name, model, per_batch in variants:
            seconds, result = measure(model, per_batch, args.repeat)
            print(f"{name:26s} evaluate {seconds:6.2f} s (median of {args.repeat})  "
                  f"val_bpb {float.fromhex(result['val_bpb_hex']):.6f}  eval_tokens {result['eval_tokens']}  "
                  f"probe_rows {result['probe_rows']}  probe_max_change {result['probe_max_change']:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
