"""Runs the project's Metal kernels on the CPU, for tests on machines without
an Apple GPU.

:class:`Emulator` is called exactly like ``mlx_memosight.kernels.MetalKernel``
(the object the wrappers launch), so a wrapper runs unchanged with
``launch=emulator``. For each call it:

1. writes the kernel source the way ``mx.fast.metal_kernel`` does (MLX's
   ``write_signature`` / ``write_template`` in mlx/backend/common/
   metal_kernel.cpp, ported line by line: input / ``*_shape`` /
   ``*_strides`` / ``*_ndim`` buffers in order, the constant address space
   for inputs of fewer than 8 elements, the thread-position attributes the
   body mentions, the template instantiation);
2. compiles it as C++ against ``metal_emulation.h`` and links
   ``runtime.cpp`` (binaries are cached by source hash);
3. passes every input as MLX would: its data pointer and strides (inputs
   that are not row contiguous are copied first when the kernel asks for
   row-contiguous inputs), inside guard bytes; outputs start as NaN bytes
   unless ``init_value`` is given;
4. runs every threadgroup of the grid with real threads and barriers, and
   returns the outputs as MLX arrays.
"""

import ctypes
import hashlib
import os
import re
import secrets
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent

# mlx/backend/common/metal_kernel.cpp: inputs with fewer elements go to the
# constant address space.
MAX_CONSTANT_ARRAY_SIZE = 8

# The attributes mx.fast.metal_kernel adds when the body mentions them, in its order.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

TYPE_STRINGS = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}

_BITS = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}

# A threadgroup array declared in a kernel body becomes a reference into the
# threadgroup's shared memory (runtime.cpp's arena).
_THREADGROUP_ARRAY = re.compile(
    r"\bthreadgroup\s+([A-Za-z_][\w:]*(?:\s*<[^;>]*>)?)\s+([A-Za-z_]\w*)\s*((?:\[[^\];]+\])+)\s*;"
)


class EmulationError(RuntimeError):
    """The emulated kernel failed to compile or run."""


def type_string(dtype) -> str:
    return TYPE_STRINGS[dtype]


def write_template(template) -> str:
    parts = []
    for _, arg in template:
        if isinstance(arg, bool):
            parts.append("1" if arg else "0")
        elif isinstance(arg, int):
            parts.append(str(arg))
        else:
            parts.append(type_string(arg))
    return "<" + ", ".join(parts) + ">"


def make_template_hash(template_def: str) -> str:
    out, i = [], 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


def kernel_name(name, template, inputs, output_dtypes) -> str:
    """``custom_kernel_<name>...``, as mx.fast.metal_kernel names it."""
    s = "custom_kernel_" + name
    if template:
        s += "_" + make_template_hash(write_template(template))
    for x in inputs:
        s += "_" + type_string(x.dtype)
        if x.ndim == 0:
            s += "s"
        elif x.size < MAX_CONSTANT_ARRAY_SIZE:
            s += "c"
    for d in output_dtypes:
        s += "_" + type_string(d)
    return s


def shape_infos(input_names, source):
    return [
        (f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
        for n in input_names
    ]


def attributes(source):
    return [(a, t) for a, t in METAL_ATTRIBUTES if a in source]


def write_signature(func_name, header, source, input_names, inputs, output_names,
                    output_dtypes, template, attrs, infos, atomic_outputs=False) -> str:
    """mx.fast.metal_kernel's generated source (MLX's ``write_signature``)."""
    s = header
    if template:
        kinds = []
        for name, arg in template:
            kind = "bool" if isinstance(arg, bool) else "int" if isinstance(arg, int) else "typename"
            kinds.append(f"{kind} {name}")
        s += "template <" + ", ".join(kinds) + ">\n"
    s += "[[kernel]] void " + func_name + "(\n"
    index = 0
    for name, x, info in zip(input_names, inputs, infos):
        location = "constant" if x.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if x.ndim == 0 else "*"
        s += f"  const {location} {type_string(x.dtype)}{ref} {name} [[buffer({index})]],\n"
        index += 1
        if x.ndim > 0:
            if info[0]:
                s += f"  const constant int* {name}_shape [[buffer({index})]],\n"
                index += 1
            if info[1]:
                s += f"  const constant int64_t* {name}_strides [[buffer({index})]],\n"
                index += 1
            if info[2]:
                s += f"  const constant int& {name}_ndim [[buffer({index})]],\n"
                index += 1
    for name, dtype in zip(output_names, output_dtypes):
        t = type_string(dtype)
        if atomic_outputs:
            t = f"atomic<{t}>"
        s += f"  device {t}* {name} [[buffer({index})]]"
        # MLX compares the buffer index (not the output count) here.
        if index < len(inputs) + len(output_names) - 1 or attrs:
            s += ",\n"
        else:
            s += ") {\n"
        index += 1
    for i, (a, t) in enumerate(attrs):
        s += f"  {t} {a} [[{a}]]"
        s += ",\n" if i < len(attrs) - 1 else ") {\n"
    s += source
    s += "\n}\n"
    return s


def full_source(kernel, inputs, template, output_dtypes):
    """The source MLX would compile, and the pieces the emulator needs."""
    name = kernel_name(kernel.name, template, inputs, output_dtypes)
    infos = shape_infos(kernel.input_names, kernel.source)
    attrs = attributes(kernel.source)
    src = write_signature(name, kernel.header, kernel.source, kernel.input_names, inputs,
                          kernel.output_names, output_dtypes, template, attrs, infos)
    if template:
        tdef = name + write_template(template)
        src += f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({tdef}) {tdef};\n'
    return name, src, infos, attrs


def _translation_unit(kernel, inputs, template, output_dtypes):
    name, src, infos, attrs = full_source(kernel, inputs, template, output_dtypes)
    # The explicit instantiation with Metal attributes is left out (not every
    # C++ compiler accepts attributes there); emu_invoke instantiates the kernel.
    src = src.split('\ntemplate [[host_name(')[0]
    src = _THREADGROUP_ARRAY.sub(
        lambda m: (f"auto& {m.group(2)} = *reinterpret_cast<{m.group(1)}(*){m.group(3)}>("
                   f"::metal_emu::threadgroup_alloc(sizeof({m.group(1)}{m.group(3)}), "
                   f"alignof({m.group(1)})));"),
        src,
    )
    args, index = [], 0
    for x, info in zip(inputs, infos):
        t = type_string(x.dtype)
        if x.ndim == 0:
            args.append(f"*reinterpret_cast<const {t}*>(buffers[{index}])")
        else:
            args.append(f"reinterpret_cast<const {t}*>(buffers[{index}])")
        index += 1
        if x.ndim > 0:
            if info[0]:
                args.append(f"reinterpret_cast<const int*>(buffers[{index}])")
                index += 1
            if info[1]:
                args.append(f"reinterpret_cast<const int64_t*>(buffers[{index}])")
                index += 1
            if info[2]:
                args.append(f"*reinterpret_cast<const int*>(buffers[{index}])")
                index += 1
    for d in output_dtypes:
        args.append(f"reinterpret_cast<{type_string(d)}*>(buffers[{index}])")
        index += 1
    args += [f"ids.{a}" for a, _ in attrs]
    call = name + (write_template(template) if template else "")
    invoke = (
        "\nvoid emu_invoke(void* const* buffers, const metal_emu::ThreadIds& ids) {\n  "
        + call + "(\n    " + ",\n    ".join(args) + ");\n}\n"
    )
    return '#include "metal_emulation.h"\n' + src + invoke


def _as_bits(x: mx.array) -> np.ndarray:
    """A numpy view of ``x``'s memory (its real strides), as unsigned ints."""
    return np.asarray(x.view(_BITS[x.dtype.size]))


def _input_table(x: mx.array, ensure_row_contiguous: bool):
    """The bytes MLX binds for an input (from its data pointer to the last
    element it reaches), its shape and its element strides."""
    a = _as_bits(x)
    if x.ndim > 0 and ensure_row_contiguous and not a.flags["C_CONTIGUOUS"]:
        a = np.ascontiguousarray(a)
    itemsize = a.itemsize
    if any(s < 0 for s in a.strides):
        raise EmulationError("negative strides are not emulated")
    if a.size == 0:
        return b"", list(a.shape), [0] * a.ndim
    extent = sum((n - 1) * s for n, s in zip(a.shape, a.strides)) + itemsize
    data = ctypes.string_at(a.__array_interface__["data"][0], extent)
    return data, list(a.shape), [s // itemsize for s in a.strides]


class Emulator:
    """Compiles and runs Metal kernels on the CPU.

    Args:
        cache_dir: where compiled binaries are kept (by source hash).
        seed: the thread schedule's seed; fresh for each call by default.
        cxx: the C++ compiler (default: ``$CXX``, else ``c++`` or ``g++``).
        flags: extra compiler flags.
    """

    def __init__(self, cache_dir=None, seed=None, cxx=None, timeout=300, flags=()):
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="metal-emulation-"))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.cxx = cxx or find_compiler()
        if self.cxx is None:
            raise EmulationError("no C++ compiler found (set CXX)")
        self.timeout = timeout
        self.flags = list(flags)
        self.last_source = None

    # -- compilation -----------------------------------------------------------
    def _runtime_object(self) -> Path:
        text = (HERE / "runtime.cpp").read_text() + (HERE / "metal_emulation.h").read_text() + str(self.flags)
        obj = self.cache_dir / f"runtime-{hashlib.sha256(text.encode()).hexdigest()[:16]}.o"
        if not obj.exists():
            self._compile(["-O2", "-c", str(HERE / "runtime.cpp"), "-o"], obj)
        return obj

    def _compile(self, args, target: Path):
        tmp = target.with_suffix(target.suffix + f".{os.getpid()}.tmp")
        cmd = [self.cxx, "-std=c++20", "-pthread", "-Wno-attributes", "-Wno-unknown-attributes",
               f"-I{HERE}"] + self.flags + args + [str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise EmulationError(f"compiling for the emulator failed:\n{r.stderr[-4000:]}")
        tmp.replace(target)

    def build(self, kernel, inputs, template, output_dtypes) -> Path:
        """Compile (or find in the cache) the binary for one kernel instance."""
        unit = _translation_unit(kernel, inputs, template, output_dtypes)
        self.last_source = unit
        runtime = self._runtime_object()
        key = hashlib.sha256((unit + runtime.name + str(self.flags)).encode()).hexdigest()[:20]
        binary = self.cache_dir / f"{kernel.name}-{key}"
        if not binary.exists():
            source = self.cache_dir / f"{kernel.name}-{key}.cpp"
            source.write_text(unit)
            self._compile(["-O1", str(source), str(runtime), "-o"], binary)
        return binary

    # -- launch ----------------------------------------------------------------
    def __call__(self, kernel, *, inputs, template=(), grid, threadgroup, output_shapes,
                 output_dtypes, init_value=None, **_):
        template = list(template or [])
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        mx.eval(inputs)
        binary = self.build(kernel, inputs, template, output_dtypes)
        infos = shape_infos(kernel.input_names, kernel.source)

        table = []  # (kind, bytes or size)
        for x, info in zip(inputs, infos):
            data, shape, strides = _input_table(x, kernel.ensure_row_contiguous)
            table.append((0, data))
            if x.ndim > 0:
                if info[0]:
                    table.append((0, struct.pack(f"<{len(shape)}i", *shape)))
                if info[1]:
                    table.append((0, struct.pack(f"<{len(strides)}q", *strides)))
                if info[2]:
                    table.append((0, struct.pack("<i", x.ndim)))
        for shape, dtype in zip(output_shapes, output_dtypes):
            n = int(np.prod(shape)) * dtype.size
            if init_value is None:
                table.append((1, n))
            else:
                init = mx.full(tuple(shape), init_value, dtype)
                table.append((2, _as_bits(init).tobytes()))

        # MLX clamps the threadgroup to the grid.
        tg = [min(t, g) for t, g in zip(threadgroup, grid)]
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            job, out = Path(tmp) / "job", Path(tmp) / "out"
            with open(job, "wb") as f:
                f.write(struct.pack("<7q", *grid, *tg, seed))
                f.write(struct.pack("<q", len(table)))
                for kind, payload in table:
                    if kind == 1:
                        f.write(struct.pack("<2q", kind, payload))
                    else:
                        f.write(struct.pack("<2q", kind, len(payload)))
                        f.write(payload)
            try:
                r = subprocess.run([str(binary), str(job), str(out)], capture_output=True,
                                   text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise EmulationError(f"{kernel.name}: the emulated kernel ran over {self.timeout} s")
            if r.returncode != 0:
                msg = r.stderr.strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
                raise EmulationError(f"{kernel.name} (seed {seed}): {msg[0]}")
            raw = out.read_bytes()
        results, offset = [], 0
        for shape, dtype in zip(output_shapes, output_dtypes):
            n = int(np.prod(shape))
            bits = np.frombuffer(raw, dtype=np.dtype(f"u{dtype.size}"), count=n, offset=offset)
            offset += n * dtype.size
            results.append(mx.array(bits.reshape(tuple(shape))).view(dtype))
        return results


def find_compiler():
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return c
    return None
