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

`CompileCache` (`train.compile_cache_dir`) keeps torch's compile caches in the user's directory, in two forms:
- `inductor/`: torch's own on-disk caches (TORCHINDUCTOR_CACHE_DIR, set for the process when the trainer starts:
  AOTAutograd and FX graphs, the compiled C++ (CPU) and Triton (GPU) kernels, autotuning results). A later run,
  or a new pod with the same volume, finds everything there and compiles nothing.
- `torch-<version>-<device>.bin`: the same artifacts as one portable file (`torch.compiler.save_cache_artifacts`,
  rewritten after a step that compiled something new), hot-loaded at start with
  `torch.compiler.load_cache_artifacts`: it can be copied alone to another store or machine (torch rebuilds
  the C++ of CPU kernels from it; GPU Triton kernels are in the file).
Artifacts of another torch version or GPU do not match torch's cache keys and are simply not used.
What is trusted: torch's cache loader unpickles its cache entries, so the directory must be as trusted as the
code (the user's own volume). This module only reads and writes bytes and paths; it refuses a directory that
anyone may write (a clear error) and skips, with a warning, an artifact file that anyone may write or that
another (non-root) user owns.
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
    """torch's compile caches in `directory`: `inductor/` (torch's on-disk caches) and one portable artifact file."""

    def __init__(self, directory: str | Path, device_type: str):
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"train.compile_cache_dir {self.dir} exists and is not a directory")
        if self.dir.is_dir() and self.dir.stat().st_mode & 0o002:
            raise ValueError(f"train.compile_cache_dir {self.dir} may be written by anyone: torch unpickles what it "
                             "finds there, so use a directory only you can write")
        version = torch.__version__.replace("+", "-")
        self.path = self.dir / f"torch-{version}-{device_type}.bin"
        self._saved_digest = ""

    def activate(self) -> None:
        """torch's on-disk compile caches go to `<directory>/inductor` for the rest of the process (Triton's
        too, unless TRITON_CACHE_DIR is set)."""
        from torch._inductor import utils as inductor_utils

        # clear_inductor_caches is the older name (torch < 2.9), kept as an alias since
        clear_caches = getattr(inductor_utils, "clear_caches", None) or inductor_utils.clear_inductor_caches
        inductor = self.dir / "inductor"
        inductor.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor.resolve())
        clear_caches()  # torch memoises paths under the previous cache dir

    def load(self) -> int:
        """`activate`, then hot-loads the artifact file into torch's caches; returns how many artifacts it held
        (0 when there is no file).

        A file torch cannot parse (truncated, or written by an incompatible torch) is reported and skipped:
        the compile then runs cold and `save` replaces the file."""
        self.activate()
        if not self.path.is_file():
            log.info("compile cache: no %s yet; compiling cold unless %s has the graphs", self.path,
                     self.dir / "inductor")
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
        try:  # cheap test first: serialising and hashing every step would cost each step tens of ms on a GPU
            from torch.compiler._cache import CacheArtifactManager

            if not CacheArtifactManager.need_serialize():
                return False
        except (ImportError, AttributeError):  # a torch without it: serialise and compare digests
            pass
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
