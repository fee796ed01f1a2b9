"""Quantized replacements for nn.Linear and nn.Conv2d.

A quantized layer holds only what it needs at inference:
  weight_packed  integer codes in their container (see packing.py)
  weight_scale   float32 per output channel
  bias           model dtype
  act_scale, act_zero_point   float32, one entry per input slice (1, or 2 for
                 the up-block shortcut conv that sees concat(hidden, skip))
  bos_out, bos_key            BOS-aware cross-attention K/V only
Before torch.compile, `hold_epilogue(model)` makes integer-path linears keep
the int8 epilogue y = acc * epilogue_scale + epilogue_bias as non-persistent
buffers (derived, not saved, refreshed when weights, ranges or the state dict
change; 8 bytes per output channel, not counted by `quantized_nbytes`), so the
compiled graph reads them instead of recomputing sum_k W on every call.  Eager
calls get the same constants from the backends' cache at no memory cost.
The float weight is gone; `weight_bits == 16` keeps it (float weight, quantized
activations).  `quantized_nbytes` predicts these bytes exactly.
`layer.kernel` says whether the layer may use int8 kernels; setting it (and
moving the layer) resolves `layer.backend`, what runs it (kernels.layer_backend).
On the prepacked int8 backends (oneDNN, FBGEMM, where machine.pick_backends chose
them) a layer's codes live in the backend's prepacked int8 copy from `prepare()`
or the first call on (see `_release_codes`): the same bytes for 5-8-bit codes,
2-4x the packed size for 2-4-bit ones (those backends have no low-bit kernels).
After a CPU layer's first integer call (or `prepare()`) its eager calls go through a
`common.Bound`: the backend's call with the copy, constants and activation parameters
resolved once, dropped when a buffer is replaced or written (version counters), the
backend changes, or the layer calibrates; compiled graphs never take it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..plan import FLOAT_BITS, LayerBits
from . import kernels
from .backends import PREPACKED, REGISTRY, common, int_mm
from .backends.int_mm import int_mm_ok
from .packing import codes_per_byte, pack, packed_nbytes, unpack
from .quantizers import ActRange, act_qparams, fake_quantize_act, quantize_weight

# How many leading values of the BOS embedding identify it.  Cheap to compare
# on every forward; a prompt's real BOS matches exactly (CLIP is causal, so
# token 0 is the same for every prompt), a zeroed negative prompt does not.
BOS_KEY_LEN = 8


def quantized_nbytes(weight_shape, has_bias: bool, bits: LayerBits, dtype: torch.dtype,
                     parts: int = 1, bos: bool = False) -> int:
    """Exact bytes a layer holds under `bits` (the float layer when W16A16)."""
    es = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(weight_shape)
    out = weight_shape[0]
    bias = out * es if has_bias else 0
    if bits.is_float:
        return numel * es + bias
    if bits.weight == FLOAT_BITS:
        weight = numel * es
    else:
        weight = packed_nbytes(numel, bits.weight) + out * 4
    extra = 2 * parts * 4  # act scale + zero point, float32, per slice
    if bos:
        extra += (out + BOS_KEY_LEN) * es
    return weight + bias + extra


def _refresh_after_load(module: "QuantLayer", _incompatible_keys) -> None:
    module._refresh_derived()  # a module-level function: hooks must pickle


def _restore_before_io(module: "QuantLayer", *_args) -> None:
    module._restore_codes()  # state_dict / load_state_dict read or write the codes


class QuantLayer(nn.Module):
    """State and arithmetic shared by QuantLinear and QuantConv2d."""

    # [(name, packed), ...] while only a backend's prepacked copies hold the codes (_release_codes)
    _held_prepacked = None
    backend = "float"  # what runs the layer (kernels.BACKENDS), resolved from `kernel`
    _bound = None  # (backend, common.Bound): eager calls with their lookups resolved (_bound_call)

    def __init__(self, weight_shape, has_bias: bool, bits: LayerBits, dtype, device=None,
                 split: int = 0, bos: bool = False):
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.weight_bits = bits.weight
        self.act_bits = bits.act
        self.split = split  # >0: input channels [:split] and [split:] get their own act range
        self.bos_aware = bos
        out = self.weight_shape[0]
        parts = 2 if split else 1
        kw = dict(device=device)
        if self.weight_bits == FLOAT_BITS:
            self.register_buffer("weight", torch.empty(self.weight_shape, dtype=dtype, **kw))
        else:
            nbytes = packed_nbytes(math.prod(self.weight_shape), self.weight_bits)
            container = torch.int8 if self.weight_bits >= 5 else torch.uint8
            self.register_buffer("weight_packed", torch.empty(nbytes, dtype=container, **kw))
            self.register_buffer("weight_scale", torch.empty(out, dtype=torch.float32, **kw))
        self.register_buffer("bias", torch.empty(out, dtype=dtype, **kw) if has_bias else None)
        self.register_buffer("act_scale", torch.ones(parts, dtype=torch.float32, **kw))
        self.register_buffer("act_zero_point", torch.zeros(parts, dtype=torch.float32, **kw))
        if bos:
            self.register_buffer("bos_out", torch.empty(out, dtype=dtype, **kw))
            self.register_buffer("bos_key", torch.empty(BOS_KEY_LEN, dtype=dtype, **kw))
        # Calibration state (not saved): None when frozen, else one ActRange per slice.
        self.observing: str | None = None  # None | "quantize" (sequential) | "float"
        self.ranges: list[ActRange] = [ActRange() for _ in range(parts)]
        # derived buffers follow a loaded state dict (export.load assigns tensors)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.register_state_dict_pre_hook(_restore_before_io)
        self.register_load_state_dict_pre_hook(_restore_before_io)

    def _refresh_derived(self) -> None:
        """Recompute buffers derived from weights and ranges (none by default)."""

    # -- which implementation runs the layer ------------------------------------------
    _kernel = "dequant"
    op = "linear"  # the layer type kernels.layer_backend decides for
    groups = 1

    @property
    def kernel(self) -> str:
        """'int_mm': int8 kernels where this device has them; 'dequant': the float path."""
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        self._kernel = value
        self._resolve_backend()

    def _resolve_backend(self) -> None:
        self._bound = None
        self.backend = kernels.layer_backend(self.op, self.weight_bits, self.act_bits, self.device,
                                             self._kernel, self.weight_shape, self.groups)

    @property
    def device(self) -> torch.device:
        return self.act_scale.device

    def prepare(self) -> None:
        """Make now what the layer's backend would make at its first call (ranges must
        be final: both depend on them): on the prepacked backends their copy of the
        codes, then kept alone, so that the first generation step neither prepacks nor
        holds two copies of every weight; on the CPU's `int_mm` the epilogue constants
        (scale, bias with the zero-point term).  Made during the first step instead,
        those small lasting tensors land between the step's large transient buffers in
        the heap and keep their pages resident: that step then peaked at three times
        the memory of a later one."""
        if self._held_prepacked is not None:
            return
        if self.backend in PREPACKED or (self.backend == "int_mm" and self.device.type == "cpu"):
            with torch.no_grad(), common.probing():
                self.forward(self._probe_input())  # not the module's hooks: no input of the model's
            self._bind()

    def refit(self) -> bool:
        """Between steps: make the backend's prepacked copy again for the input shape the
        layer has met, where it was made for none (common.prepack_shape); returns whether."""
        if self.backend not in PREPACKED or not common.refit_due(self.weight_packed):
            return False
        self._bound = None  # bound to the copy made again now
        with torch.no_grad(), common.probing():
            self.forward(self._probe_input())
        self._bind()
        return True

    # -- one copy of the codes on prepacked backends ------------------------------
    def _release_codes(self, fresh) -> None:
        """oneDNN and FBGEMM run on a prepacked int8 copy of the weight made on the
        first call; `fresh` is that copy (common.take_fresh_prepacked).  Keep only it:
        our codes' storage is dropped and read back from it whenever the codes are
        needed (state_dict, .to(), pickling, the float paths).  5-8-bit codes are
        stored in int8, the size of the prepacked copy; 2-4-bit layers then hold int8
        instead of their packed codes (that copy is what the backend runs, and what
        model_nbytes then counts)."""
        t = self.weight_packed
        if t.device.type != "cpu" or t.is_inference():
            return
        try:
            t.untyped_storage().resize_(0)
        except RuntimeError:  # a storage that cannot shrink (e.g. mapped from a file)
            return
        self._held_prepacked = fresh
        common.hold_codes(t, fresh)

    def _restore_codes(self) -> None:
        """Give the codes their own storage again, for code that reads the buffer."""
        if self._held_prepacked is None:
            return
        self._bound = None  # the next call goes the way that drops the codes again
        t, held = self.weight_packed, self._held_prepacked
        codes = common.read_back(held)
        # same contents as before the release: keep the version, so that the
        # backend's prepacked copy (keyed on it) stays valid...
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(t):
            t.untyped_storage().resize_(t.numel() * t.element_size())
            t.copy_(pack(codes, self.weight_bits))
        self._held_prepacked = None
        common.hold_codes(t, None)
        for name, _ in held:  # ...and drop ours again after the next integer call
            common.note_prepacked(t, name)

    def _apply(self, fn, recurse=True):
        self._restore_codes()  # .to() / .half() / .cuda() copy the codes
        out = super()._apply(fn, recurse)
        self._resolve_backend()  # the device may have changed
        return out

    def __getstate__(self):
        self._restore_codes()  # pickling and deepcopy copy the codes
        state = dict(super().__getstate__())
        state.pop("_bound", None)  # bound to this layer's tensors, not the copy's
        return state

    # -- construction ---------------------------------------------------------
    def _load_float(self, weight: torch.Tensor, bias: torch.Tensor | None, bos_embedding=None):
        with torch.no_grad():
            if self.weight_bits == FLOAT_BITS:
                # the float layer's own tensor, not a copy: observing an SDXL-size UNet's
                # ranges in float would otherwise hold its weights twice
                self.weight = weight.detach()
            else:
                if codes_per_byte(self.weight_bits) == 1:  # the buffer holds the codes as they are
                    _, scale = quantize_weight(weight, self.weight_bits, out=self.weight_packed)
                else:
                    q, scale = quantize_weight(weight, self.weight_bits)
                    self.weight_packed.copy_(pack(q, self.weight_bits))
                self.weight_scale.copy_(scale)
            if bias is not None:
                self.bias.copy_(bias)
            if self.bos_aware:
                e = bos_embedding.to(weight.dtype).reshape(1, 1, -1)
                # W e_BOS + b with the *float* weight: token 0 stays exact.
                self.bos_out.copy_(F.linear(e, weight, bias).reshape(-1))
                self.bos_key.copy_(e.reshape(-1)[:BOS_KEY_LEN])
        self._refresh_derived()

    def requantize_weight(self, bits: int) -> None:
        """Re-round the weight to `bits` (5..7, narrower than now: the int8 container
        stays) from its own codes, for a loaded model that has no float weights left:
        load_quantized(int8_safe=True).  Rounded twice, so a little worse than
        quantizing the float weight to `bits` directly (quantize does that)."""
        if not 5 <= bits < self.weight_bits <= 8:
            raise ValueError(f"cannot requantize {self.weight_bits}-bit weight codes to {bits} bits "
                             "in place: only 8/7/6-bit codes to fewer bits, 5 or more")
        self._restore_codes()
        q, scale = quantize_weight(self.dequantized_weight(torch.float32), bits)
        with torch.no_grad():
            self.weight_packed.copy_(pack(q, bits))  # a new version: backends' caches drop the old
            self.weight_scale.copy_(scale)
        self.weight_bits = bits
        self._resolve_backend()
        self._refresh_derived()

    @property
    def dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else (
            self.weight.dtype if self.weight_bits == FLOAT_BITS else self.bos_out.dtype
            if self.bos_aware else torch.float32)

    @property
    def bits(self) -> LayerBits:
        return LayerBits(self.weight_bits, self.act_bits)

    def int_codes(self) -> torch.Tensor:
        """Integer weight codes (int8) in the weight's shape: a view for 5-8 bits,
        unpacked for 2/3/4 bits (a transient int8 tensor, never a float copy).  Where the
        backend copies the codes (_copies_codes) a copy for 5-8 bits too: its next integer
        call drops the buffer's storage (_release_codes), and a view would read freed memory."""
        codes = self._codes_now()
        if self.weight_bits >= 5 and self._held_prepacked is None and self._copies_codes():
            return codes.clone()
        return codes

    def _copies_codes(self) -> bool:
        """Whether this layer's integer calls make their own copy of the codes, which
        then replaces the buffer's (_release_codes): the prepacked backends, and
        int_mm's convs on the CPU (patch-order codes, int_mm.TapMajorCodes)."""
        return self.backend in PREPACKED or (self.backend == "int_mm" and int_mm.holds_taps(self))

    def _codes_now(self) -> torch.Tensor:
        """int_codes for use within the current call only (5-8 bits: always the view)."""
        if self._held_prepacked is not None:  # read back, transient like unpacked codes
            return common.read_back(self._held_prepacked).reshape(self.weight_shape)
        return unpack(self.weight_packed, self.weight_bits, self.weight_shape)

    def _codes_arg(self):
        """The codes for the integer kernels: 5-8-bit codes are a free view; 2/3/4-bit
        ones (and released ones) go as the unpacking method, so that backends
        holding a prepacked copy (oneDNN, FBGEMM) do not unpack them on every call."""
        if self.weight_bits >= 5 and self._held_prepacked is None:
            return self._codes_now()
        return self._codes_now

    def _after_int_call(self) -> None:
        fresh = common.take_fresh_prepacked(self.weight_packed)
        if fresh is not None:
            self._release_codes(fresh)
        self._bind()

    def _bind(self) -> None:
        """After a CPU eager integer call or probe, which made what the backend makes once:
        bind the backend's call to this layer (common.Bound), where the backend can."""
        bind = getattr(REGISTRY[self.backend], "bind", None)
        if (bind is None or self.device.type != "cpu" or torch.compiler.is_compiling() or common.probing.active
                or any(t is not None and t.is_inference() for t in self._buffers.values())):
            return
        bound = bind(self)
        self._bound = None if bound is None else (self.backend, bound.tie(self._buffers))

    def _bound_call(self) -> common.Bound | None:
        """The layer's Bound where this call may take it: eager, not calibrating nor
        probing, the backend it was bound for, the same buffers at the same versions."""
        if torch.compiler.is_compiling() or self._bound is None:
            return None
        backend, bound = self._bound
        if (backend != self.backend or self.observing is not None or common.probing.active
                or not bound.holds(self._buffers)):
            return None
        return bound

    def _int_path(self) -> bool:
        """Whether calls run the integer kernels: a backend resolved for them, and not
        calibrating (which observes the float input)."""
        return self.backend != "float" and self.observing is None

    def dequantized_weight(self, dtype, *, scratch: bool = False) -> torch.Tensor:
        """The float weight (W16: the held one).  scratch=True, for a forward's
        own use only: on the CPU, written into the thread's reusable buffer, so
        it is valid until the next such call."""
        if self.weight_bits == FLOAT_BITS:
            return self.weight.to(dtype)
        q = self._codes_now()
        scale = self.weight_scale.to(dtype).view((-1,) + (1,) * (q.dim() - 1))
        if scratch and common.scratch_ok(q):
            return common.scratch("weight", q.shape, dtype).copy_(q).mul_(scale)
        # in place: `q.to(dtype) * scale` allocates the float weight twice (and
        # the int8 * float promotion runs unvectorised: 2.4x slower on SDXL's
        # 1280-channel 3x3 conv)
        return q.to(dtype).mul_(scale)

    # -- activations -------------------------------------------------------------
    def _slices(self, x: torch.Tensor, dim: int):
        if not self.split:
            return [x]
        return [x.narrow(dim, 0, self.split), x.narrow(dim, self.split, x.shape[dim] - self.split)]

    def _quantize_input(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Fake-quantize x (observing first when calibrating)."""
        if self.act_bits == FLOAT_BITS and self.observing is None:
            return x
        parts = self._slices(x, dim)
        if self.observing is not None:
            for r, p in zip(self.ranges, parts):
                r.update(p)
            if self.observing == "float" or self.act_bits == FLOAT_BITS:
                return x
            # Sequential calibration: downstream layers see this layer's input
            # quantized with the range gathered so far.
            self._freeze_ranges()
        out = [fake_quantize_act(p, self.act_scale[i], self.act_zero_point[i], self.act_bits)
               for i, p in enumerate(parts)]
        return out[0] if len(out) == 1 else torch.cat(out, dim=dim)

    def _freeze_ranges(self) -> None:
        if self.act_bits == FLOAT_BITS:
            return
        for i, r in enumerate(self.ranges):
            scale, zp = act_qparams(r.lo, r.hi, self.act_bits)
            self.act_scale[i] = scale
            self.act_zero_point[i] = zp

    def set_ranges(self, ranges: list[ActRange]) -> None:
        if len(ranges) != len(self.ranges):
            raise ValueError(f"expected {len(self.ranges)} activation ranges, got {len(ranges)}")
        self.ranges = [ActRange(r.lo, r.hi, r.batches) for r in ranges]
        with torch.no_grad():
            self._freeze_ranges()
        self._refresh_derived()

    def start_observing(self, mode: str) -> None:
        self.observing = mode
        self.ranges = [ActRange() for _ in self.ranges]

    def stop_observing(self) -> None:
        self.observing = None
        with torch.no_grad():
            self._freeze_ranges()
        self._refresh_derived()

    def extra_repr(self) -> str:
        s = f"{tuple(self.weight_shape)}, W{self.weight_bits}A{self.act_bits}, backend={self.backend}"
        if self.split:
            s += f", split={self.split}"
        if self.bos_aware:
            s += ", bos_aware"
        return s


def _capturing(x: torch.Tensor) -> bool:
    """Whether x's CUDA stream is being captured into a CUDA graph."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class QuantLinear(QuantLayer):
    # diffusers reads these off its layers (e.g. SDXL's add_embedding.linear_1.in_features)
    in_features = property(lambda self: self.weight_shape[1])
    out_features = property(lambda self: self.weight_shape[0])
    holds_epilogue = False  # hold_epilogue() sets it

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: LayerBits, bos_embedding=None) -> "QuantLinear":
        layer = cls(linear.weight.shape, linear.bias is not None, bits, linear.weight.dtype,
                    linear.weight.device, bos=bos_embedding is not None)
        layer._load_float(linear.weight, linear.bias, bos_embedding)
        layer.kernel = kernels.select_kernel(linear.weight.device)
        return layer

    def hold_epilogue(self) -> bool:
        """Keep the epilogue constants as buffers from now on (see the module doc).
        Returns whether this layer has an integer path that uses them."""
        self.holds_epilogue = self.weight_bits <= 8 and self.act_bits == 8
        self._refresh_derived()
        return self.holds_epilogue

    def _refresh_derived(self) -> None:
        if not self.holds_epilogue:
            return
        with torch.no_grad():
            scale, bias = common.epilogue_consts(self._codes_now(), self.weight_scale, self.bias,
                                                   self.act_scale, self.act_zero_point, key=self.weight_packed)
        self.register_buffer("epilogue_scale", scale.clone(), persistent=False)
        self.register_buffer("epilogue_bias", bias.clone(), persistent=False)

    def _probe_input(self) -> torch.Tensor:
        return torch.zeros(1, self.weight_shape[1], dtype=self.dtype, device=self.device)

    def _linear(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        bound = self._bound_call()
        if bound is not None:
            kernels.note_ran(self, self.backend)
            if residual is not None and bound.run_add is not None and _sums_into(residual, x, self.weight_shape[0]):
                return bound.run_add(x, residual)
            return add_into(residual, bound.run(x))
        # torch._int_mm's shape limits on CUDA bind only that backend (the triton kernel
        # takes any shape: a step's few-row time-embedding linears stay on it)
        rows = x.numel() // x.shape[-1]
        if self._int_path() and (self.backend != "int_mm"
                                 or int_mm_ok(rows, x.shape[-1], self.weight_shape[0], x.device)):
            kernels.note_ran(self, self.backend)
            backend = REGISTRY[self.backend]
            if (residual is not None and hasattr(backend, "linear_add")
                    and _sums_into(residual, x, self.weight_shape[0])):
                y = backend.linear_add(self, x, residual)
            else:
                y = add_into(residual, backend.linear(self, x))
            self._after_int_call()
            return y
        kernels.note_ran(self, "float")
        w = self.dequantized_weight(x.dtype, scratch=True)
        return add_into(residual, F.linear(self._quantize_input(x, -1), w, self.bias))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output, or with `residual` (a tensor of its shape) residual + output:
        written into residual's memory outside autograd and tracing (add_into), by the
        kernel itself where the backend has `linear_add`."""
        if not self.bos_aware or x.dim() != 3:
            return self._linear(x, residual)
        return add_into(residual, self._bos_aware(x))

    def _bos_aware(self, x: torch.Tensor) -> torch.Tensor:
        # BOS-aware K/V: token 0 in full precision, tokens 1.. quantized (and only
        # they set the activation range).
        is_bos = (x[:, 0, :BOS_KEY_LEN] == self.bos_key).all(dim=-1)
        head = self.bos_out.to(x.dtype).expand(x.shape[0], 1, -1)
        if torch.compiler.is_compiling() or _capturing(x):
            # no data-dependent branch in a traced graph, nor a host sync while a
            # CUDA graph is captured (bool() of a CUDA tensor fails the capture):
            # every token takes the quantized path and the BOS rows get their
            # exact output.  A token 0 that is not the BOS keeps the quantized
            # result; in practice that is a zeroed negative prompt, which it
            # computes as eager's float path does, up to float rounding (zero is
            # the zero point's code).
            y = self._linear(x)
            return torch.cat([torch.where(is_bos.view(-1, 1, 1), head, y[:, :1]), y[:, 1:]], dim=1)
        rest = self._linear(x[:, 1:])
        first = x[:, :1]
        if not bool(is_bos.all()):
            # e.g. a zeroed negative prompt has no real BOS: compute that token
            # on the fly, float input, no activation quantization.
            exact = F.linear(first, self.dequantized_weight(x.dtype), self.bias)
            head = torch.where(is_bos.view(-1, 1, 1), head, exact)
        return torch.cat([head, rest], dim=1)


def add_into(residual: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """residual + y (y without a residual), summed in residual's memory where nothing can
    need the residual apart: outside autograd and tracing.  Float addition commutes, so
    the sum has the bits of diffusers' `y + residual`."""
    if residual is None:
        return y
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or residual.shape != y.shape
            or residual.dtype != y.dtype or (residual.is_inference() and not torch.is_inference_mode_enabled())):
        return y + residual
    return residual.add_(y)


def _sums_into(residual: torch.Tensor, x: torch.Tensor, n: int) -> bool:
    """Whether a kernel can add its n outputs per row of x into residual's memory
    (linear_add): where add_into would sum in place, into dense float32 of the output's shape."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and residual.dtype == x.dtype == torch.float32 and residual.shape == (*x.shape[:-1], n)
            and residual.is_contiguous() and (not residual.is_inference() or torch.is_inference_mode_enabled()))


class QuantConv2d(QuantLayer):
    op = property(lambda self: "split" if self.split else "conv")
    groups = property(lambda self: self.conv_args.get("groups", 1))
    in_channels = property(lambda self: self.weight_shape[1] * self.groups)
    out_channels = property(lambda self: self.weight_shape[0])
    kernel_size = property(lambda self: tuple(self.weight_shape[2:]))

    def __init__(self, weight_shape, has_bias, bits, dtype, device=None, split=0, bos=False,
                 conv_args: dict | None = None):
        super().__init__(weight_shape, has_bias, bits, dtype, device, split=split, bos=False)
        self.conv_args = dict(conv_args or {})

    @staticmethod
    def conv_args_of(conv: nn.Conv2d) -> dict:
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={conv.padding_mode!r} is not supported")
        return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                    groups=conv.groups)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: LayerBits, split: int = 0) -> "QuantConv2d":
        layer = cls(conv.weight.shape, conv.bias is not None, bits, conv.weight.dtype,
                    conv.weight.device, split=split, conv_args=cls.conv_args_of(conv))
        layer._load_float(conv.weight, conv.bias)
        layer.kernel = kernels.select_kernel(conv.weight.device)
        return layer

    def _probe_input(self) -> torch.Tensor:
        _, c, kh, kw = self.weight_shape
        dh, dw = common._pair(self.conv_args.get("dilation", 1))
        return torch.zeros(1, c * self.groups, dh * (kh - 1) + 1, dw * (kw - 1) + 1,
                           dtype=self.dtype, device=self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bound = self._bound_call()
        if bound is not None:
            kernels.note_ran(self, self.backend)
            return bound.run(x)
        if self._int_path():
            kernels.note_ran(self, self.backend)
            y = REGISTRY[self.backend].conv2d(self, x)
            self._after_int_call()
            return y
        kernels.note_ran(self, "float")
        w = self.dequantized_weight(x.dtype, scratch=True)
        return F.conv2d(self._quantize_input(x, 1), w, self.bias, **self.conv_args)


def prepare(model: nn.Module) -> int:
    """Make what every layer's backend makes once now, layer by layer (see
    QuantLayer.prepare: prepacked int8 copies, int_mm's constants), then return the
    freed code pages to the system.  Returns how many layers now hold only their
    prepacked copy."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    for layer in layers:
        layer.prepare()
    if any(layer._held_prepacked is not None for layer in layers):
        _trim_heap()
    return sum(layer._held_prepacked is not None for layer in layers)


def refit(model: nn.Module) -> int:
    """QuantLayer.refit for every layer whose copy is due, then the freed pages handed
    back; returns how many were made again.  One check when none is due."""
    if not common.refit_pending():
        return 0
    n = sum(m.refit() for m in model.modules() if isinstance(m, QuantLayer))
    if n:
        _trim_heap()
    return n


def _refit_after_step(model, _args, _out) -> None:
    """Forward hook: the model's step is done, its transient buffers freed: refit now."""
    if not torch.compiler.is_compiling():
        refit(model)


def refit_after_steps(model: nn.Module, on: bool = True) -> None:
    """Install (on) or remove the forward hook that refits `model`'s prepacked copies after
    a step, once its layers have met their input shapes (quantize and load do, on the CPU)."""
    for key, hook in list(model._forward_hooks.items()):
        if hook is _refit_after_step:
            del model._forward_hooks[key]
    if on:
        model.register_forward_hook(_refit_after_step)


def _trim_heap() -> None:
    """glibc keeps freed heap pages resident; hand them back (Linux only, best effort)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def hold_epilogue(model: nn.Module) -> int:
    """Call before torch.compile (after quantize or load): every integer-path
    QuantLinear keeps its epilogue constants as buffers.  Returns how many do."""
    return sum(m.hold_epilogue() for m in model.modules() if isinstance(m, QuantLinear))
