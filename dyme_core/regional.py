"""Regional compilation of the update and a compile cache that outlives the process (DESIGN.md section 7).

`train.compile_update` compiles the text model's repeated decoder block, not the whole model: one
`torch.compile` of the decoder-layer class's `forward` (dynamic shapes: the rows and the sequence length
change every step) serves every layer, because the layers differ only in their parameters, which the
compiled graph takes as inputs. Compile time is then that of one layer, whatever the depth; the
embeddings, the rotary tables, the mask and the LM head stay eager (a small share of the time).

The compiled forward is installed on the layers only inside `RegionalCompile.active()`, which the
trainer enters around the update's forward; generation and evaluation keep the plain layers (HF's static
cache compiles its own decode step, and a compiled layer inside it would be traced twice). The backward
of a compiled forward is compiled too (AOTAutograd), so forward and backward are both covered.

`CompileCache` keeps torch's compile artifacts (AOTAutograd graphs, inductor's generated code, Triton
kernels, dynamic-shape decisions) in one file per torch version and device type,
`<train.compile_cache_dir>/torch-<version>-<device>.bin`, written with `torch.compiler.save_cache_artifacts`
and hot-loaded with `torch.compiler.load_cache_artifacts` when a later process (another run, a new pod
with the same volume) starts: its compile is then a cache hit instead of a fresh inductor compile (Dynamo
still traces the layer, which takes seconds). What is trusted: the file is parsed by torch's own cache
loader, which unpickles inductor's cache entries, so the directory must be as trusted as the code (the
user's own volume); this module only reads and writes the bytes, and refuses a file that anyone may
write or that another (non-root) user owns. Artifacts of another torch version or
GPU do not match torch's cache keys and are simply not used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The text model's decoder layers: the modules of the first `ModuleList` whose entries are all of one
    class named `*DecoderLayer` (Llama/SmolLM2 in Idefics3, Qwen2 in LLaVA-OneVision, Qwen2-VL's own);
    vision blocks (`*EncoderLayer`, `*VisionBlock`) are not taken."""
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and next(iter(kinds)).__name__.endswith("DecoderLayer"):
                return list(module)
    raise ValueError(f"train.compile_update: no decoder layers (*DecoderLayer) found in {type(model).__name__}")


class RegionalCompile:
    """One compiled forward per decoder-layer class, switched on for the layers inside `active()`."""

    def __init__(self, model: torch.nn.Module, backend: str = "inductor"):
        self.layers = decoder_layers(model)
        cls = type(self.layers[0])
        # the class's function, not a bound method: one Dynamo cache entry (keyed by the code object)
        # serves every layer, since the layer arrives as an argument whose parameters become graph inputs
        self.compiled: Callable = torch.compile(cls.forward, dynamic=True, backend=backend)
        self._depth = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The layers run the compiled forward inside this block (re-entrant); plain forward outside."""
        if self._depth == 0:
            for layer in self.layers:
                # an instance attribute shadows the class's forward; nn.Module.__call__ (hooks,
                # gradient checkpointing) still runs around it, eagerly
                layer.forward = functools.partial(self.compiled, layer)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                for layer in self.layers:
                    del layer.forward


class CompileCache:
    """torch's compile artifacts of this process, loaded from and saved to `<directory>/torch-<ver>-<dev>.bin`."""

    def __init__(self, directory: str | Path, device_type: str):
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"train.compile_cache_dir {self.dir} exists and is not a directory")
        version = torch.__version__.replace("+", "-")
        self.path = self.dir / f"torch-{version}-{device_type}.bin"
        self._saved_digest = ""

    def load(self) -> int:
        """Hot-loads the file's artifacts into torch's caches; returns how many (0 when there is no file).

        A file torch cannot parse (truncated, or written by an incompatible torch) is reported and skipped:
        the compile then runs cold and `save` replaces the file."""
        if not self.path.is_file():
            log.info("compile cache: no %s yet; compiling cold", self.path)
            return 0
        st = self.path.stat()
        # what torch unpickles must come from this user (or root, e.g. a volume prepared by an init job):
        # a file anyone may write, or another user's, is not loaded (like ssh with its keys)
        if st.st_mode & 0o002 or st.st_uid not in (os.getuid(), 0):
            log.warning("compile cache: %s is writable by anyone or owned by another user; not loaded, "
                        "compiling cold", self.path)
            return 0
        data = self.path.read_bytes()
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as e:  # torch raises various errors for foreign bytes; a cold compile is the fallback
            info, reason = None, f"{type(e).__name__}: {e}"
        else:
            reason = "torch's loader rejected it"  # torch returns None (and logs why) for corrupt bytes
        if info is None:
            log.warning("compile cache: %s could not be loaded (%s); compiling cold", self.path, reason)
            return 0
        self._saved_digest = hashlib.sha256(data).hexdigest()
        n = sum(len(v) for v in info.artifacts.values())
        log.info("compile cache: loaded %d artifacts from %s", n, self.path)
        return n

    def save(self) -> bool:
        """Writes this process's artifacts when they changed since the last load/save (atomic rename);
        returns whether it wrote."""
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            return False
        data = result[0]
        digest = hashlib.sha256(data).hexdigest()
        if not data or digest == self._saved_digest:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        self._saved_digest = digest
        log.info("compile cache: saved %d bytes to %s", len(data), self.path)
        return True
