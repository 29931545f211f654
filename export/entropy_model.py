"""The masked-token entropy model's integer network as an ONNX graph and in torch float64.

Both compute exactly the integers of the numpy reference `perco.engine.entropy.intnet.IntNet`
(docs/entropy-model-arithmetic.md). The ONNX graph is built node by node with `onnx.helper` from
ops ONNX Runtime's CPU provider runs on these types: Gather on a uint8 table, ConvInteger (uint8
activations with zero point 0, the int8 weights stored as uint8 with zero point 128: ORT's CPU
ConvInteger takes uint8 weights), int32 Add/Max, and the requantization in int64 (Mul, Add, then Div
by 2^s, which truncates and so floors the nonnegative dividend). `TorchIntNet` runs unchanged on
CUDA: its convolutions are im2col (`unfold`) plus float64 matrix products, exact because every
partial sum is an integer below 2^31.
"""

from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from perco.engine.entropy.intnet import ACT_MAX, IntNetConfig, validate_weights
from perco.engine.entropy.tables import LOGIT_MAX_STEPS

OPSET = 17
IR_VERSION = 8  # the IR of opset 17, read by every onnxruntime >= 1.17


def onnx_graph(config: IntNetConfig, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The network as ONNX: input `ids` int64 [h, w] (MASK = K, h and w dynamic); outputs `logits`
    int32 [K, h, w] and `steps` int64 [K, h, w] (the logit steps of the tables procedure)."""
    validate_weights(config, weights)
    c, k = config.channels, config.codebook_size
    inits, nodes = [], []

    def const(name: str, value, dtype) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list, output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def per_channel(name: str, value, dtype) -> str:  # broadcast over [1, C, h, w]
        return const(name, np.broadcast_to(np.asarray(value, dtype=np.int64), (c,)).reshape(1, c, 1, 1), dtype)

    zero_u8, zero_point = const("x_zero_point", 0, np.uint8), const("w_zero_point", 128, np.uint8)
    x = node("Gather", [const("embed", weights["embed"], np.uint8), "ids"], "embedded")  # [h, w, C]
    x = node("Transpose", [x], "embedded_chw", perm=[2, 0, 1])
    x = node("Unsqueeze", [x, const("axis0", [0], np.int64)], "x_in")
    for index, (kernel, dilation) in enumerate(config.layers):
        p = f"conv{index}"
        pad = dilation * (kernel - 1) // 2
        weight = const(f"{p}.weight_u8", weights[f"{p}.weight"].astype(np.int16) + 128, np.uint8)
        acc = node("ConvInteger", [x, weight, zero_u8, zero_point], f"{p}.conv", kernel_shape=[kernel, kernel],
                   dilations=[dilation, dilation], pads=[pad] * 4)
        acc = node("Add", [acc, const(f"{p}.bias", weights[f"{p}.bias"].reshape(1, c, 1, 1), np.int32)], f"{p}.acc")
        acc = node("Max", [acc, const(f"{p}.zero", 0, np.int32)], f"{p}.relu")
        acc = node("Cast", [acc], f"{p}.relu64", to=TensorProto.INT64)
        shift = weights[f"{p}.shift"].astype(np.int64)
        acc = node("Mul", [acc, per_channel(f"{p}.multiplier", weights[f"{p}.multiplier"], np.int64)], f"{p}.scaled")
        acc = node("Add", [acc, per_channel(f"{p}.half", np.int64(1) << (shift - 1), np.int64)], f"{p}.rounded")
        acc = node("Div", [acc, per_channel(f"{p}.divisor", np.int64(1) << shift, np.int64)], f"{p}.shifted")
        acc = node("Min", [acc, const(f"{p}.cap", ACT_MAX, np.int64)], f"{p}.clipped")
        x = node("Cast", [acc], f"{p}.out", to=TensorProto.UINT8)
    head = const("head.weight_u8", weights["head.weight"].astype(np.int16) + 128, np.uint8)
    logits = node("ConvInteger", [x, head, zero_u8, zero_point], "head.conv", kernel_shape=[1, 1])
    logits = node("Add", [logits, const("head.bias", weights["head.bias"].reshape(1, k, 1, 1), np.int32)], "head.acc")
    logits = node("Squeeze", [logits, "axis0"], "logits")
    wide = node("Cast", [logits], "logits64", to=TensorProto.INT64)
    top = node("ReduceMax", [wide], "logits_max", axes=[0], keepdims=1)
    steps = node("Sub", [top, wide], "below_max")
    steps = node("Mul", [steps, const("logit_multiplier", config.logit_multiplier, np.int64)], "steps_scaled")
    steps = node("Div", [steps, const("logit_divisor", 1 << config.logit_shift, np.int64)], "steps_shifted")
    node("Min", [steps, const("steps_cap", LOGIT_MAX_STEPS, np.int64)], "steps")
    graph = helper.make_graph(
        nodes, "perco_entropy_intnet", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.INT32, [k, "h", "w"]),
         helper.make_tensor_value_info("steps", TensorProto.INT64, [k, "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="perco-engine")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


class TorchIntNet(torch.nn.Module):
    """The network in torch float64 (CPU or CUDA): `forward(ids)` -> int32 logits [K, h, w], as IntNet.logits."""

    def __init__(self, config: IntNetConfig, weights: Mapping[str, np.ndarray], device="cpu"):
        super().__init__()
        validate_weights(config, weights)
        self.config = config
        c, k = config.channels, config.codebook_size

        def f64(array) -> torch.Tensor:
            return torch.from_numpy(np.asarray(array, dtype=np.float64).copy())

        def column(name: str) -> torch.Tensor:  # scalar or [C] -> [C, 1]
            return f64(np.broadcast_to(weights[name].astype(np.int64), (c,)).reshape(c, 1))

        self.register_buffer("embed", f64(weights["embed"]))
        for index in range(len(config.layers)):
            p = f"conv{index}"
            shift = column(f"{p}.shift")
            self.register_buffer(f"{p}_weight", f64(weights[f"{p}.weight"].reshape(c, -1)))
            self.register_buffer(f"{p}_bias", column(f"{p}.bias"))
            self.register_buffer(f"{p}_multiplier", column(f"{p}.multiplier"))
            self.register_buffer(f"{p}_half", torch.exp2(shift - 1))
            self.register_buffer(f"{p}_divisor", torch.exp2(shift))
        self.register_buffer("head_weight", f64(weights["head.weight"].reshape(k, c)))
        self.register_buffer("head_bias", f64(weights["head.bias"].reshape(k, 1)))
        self.to(device)

    def _ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.embed.device)
        if ids.dim() != 2 or ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) > self.config.mask:
            raise ValueError(f"expected a non-empty [h, w] grid of ids in [0, {self.config.mask}]")
        return ids

    def forward(self, ids) -> torch.Tensor:
        ids = self._ids(ids)
        h, w = ids.shape
        x = self.embed[ids].permute(2, 0, 1).unsqueeze(0)  # [1, C, h, w]
        for index, (kernel, dilation) in enumerate(self.config.layers):
            p = f"conv{index}"
            cols = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
            acc = getattr(self, f"{p}_weight") @ cols[0] + getattr(self, f"{p}_bias")
            y = torch.floor((acc.clamp(min=0) * getattr(self, f"{p}_multiplier") + getattr(self, f"{p}_half"))
                            / getattr(self, f"{p}_divisor")).clamp(max=ACT_MAX)
            x = y.reshape(1, -1, h, w)
        logits = self.head_weight @ x.reshape(self.config.channels, h * w) + self.head_bias
        return logits.reshape(-1, h, w).to(torch.int32)

    def steps(self, ids) -> torch.Tensor:
        """int64 logit steps [K, h, w], as the ONNX graph's `steps` output."""
        return self.steps_of(self.forward(ids))

    def steps_of(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.to(torch.float64)
        below = logits.amax(dim=0, keepdim=True) - logits
        steps = torch.floor(below * self.config.logit_multiplier / 2.0 ** self.config.logit_shift)
        return steps.clamp(max=LOGIT_MAX_STEPS).to(torch.int64)


class EntropyGraph(torch.nn.Module):
    """The `entropy_model` graph of the torch backend: ids -> (int32 logits, int64 steps) [K, h, w]."""

    def __init__(self, model, device="cpu"):  # model: a perco.engine.entropy.learned.EntropyModel
        super().__init__()
        self.net = TorchIntNet(model.config, model.net.weights, device=device)

    def forward(self, ids):
        logits = self.net(ids)
        return logits, self.net.steps_of(logits)


def export_entropy_graph(model, path) -> None:
    """Write the ONNX graph of an EntropyModel to `path` (checked by onnx.checker in `onnx_graph`)."""
    from perco.engine.files import atomic_write

    atomic_write(path, onnx_graph(model.config, model.net.weights).SerializeToString())
