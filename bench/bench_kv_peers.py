"""The KV-cache peers at equal bytes: headlens latents (keys and values), latents stored in FP8, transformers'
quantized caches (FP8, quanto, HQQ) and kvpress's token eviction, judged on the same contexts by the same
teacher-forced next-token KL, in one run on tiny-lm and tiny-moe.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_kv_peers.py [--models tiny-lm,tiny-moe] [--contexts 8]
        [--ratios 0.5,0.25,0.125] [--venvs DIR | --no-install] [--json PATH] [--out DIR] [--threads 1]

Contexts: ``--contexts`` windows of 256 tokens (the window the models were trained on), cut one after another from
``tools/train/heldout.txt`` (never trained on) after the last of the shipped calibration paragraphs, tokenized with
the model's tokenizer. The first 192 tokens are the prefix whose cache is compressed; the last 64 are scored
teacher-forced: a 192-token prefill, then one token a step through the cache (positions given explicitly, so a cache
that evicted tokens still rotates the next ones at their true positions). The logits at the 64 scored positions
(the last prefill position and the 63 steps) are compared with the uncompressed model's (DynamicCache): next-token
KL (mean, nats), top-1 agreement, perplexity of the true next tokens.

Bytes: every tensor a cache holds after the prefill (the compressed prefix; the table's ``KV bytes/token``, the
figure's x) and after the pass (``end``), read from the tensors, divided by the tokens cached. The model runs in
float32 on this CPU and the 100% is the 2-byte (16-bit) cache, so float32 tensors (keys, values, latents, scales,
zero points) count 2 bytes a number, as they would in a 16-bit model; FP8, integer and packed tensors count their own
size (int32 positions of rotary key latents: 4 bytes). Methods, at KV bytes per token of ``--ratios`` of the
original:

- ``latent``: headlens's data-aware value and key latents (``run_compress`` on the model's shipped calibration texts,
  never the scored contexts), cut by an allocation (:data:`ALLOCATIONS`; measured here: ``uniform``, one k per kv
  group for values and one for keys, the largest whose bytes, positions counted, fit the ratio;
  values get the odd dimension), stored as ``LatentCache.from_plans``.
- ``latent+fp8``: the same latents (sized again for 1-byte numbers) rounded through ``torch.float8_e4m3fn`` with one
  scale per token and slot (keys or values of a layer), the scale rounded to float16 and counted at 2 bytes
  (simulated storage: the rounded latents are held in float32 and counted at 1 byte a number).
- ``fp8 (QuantizedCache)``: transformers' ``QuantizedCache(backend="fp8")``, one scale per tensor (50%).
- ``quanto int4/int2``, ``hqq int4/int2``: ``QuantizedCache(backend="quanto"|"hqq", nbits=4|2)``, transformers'
  defaults otherwise (groups of 64, a 128-token full-precision residual: the 63 decoded tokens stay unquantized),
  scales and zero points counted; they need optimum-quanto / hqq, installed into a throwaway venv (``--venvs``).
- kvpress presses (``knorm``, ``streaming_llm``, ``snapkv``, ``expected_attention``, ``tova``) at
  ``compression_ratio = 1 - ratio`` applied during the prefill (``with press(model)``), decoding on after it
  uncompressed; kvpress pins transformers < 5.3, so it runs in its own throwaway venv with that transformers.

Wall time and peak RSS growth (``/proc/self/clear_refs``, VmHWM over the RSS before) are those of each method's
prefill + scoring passes over all contexts, in its own worker process (one per model and environment), one torch
thread (``--threads``). Nothing is tuned: the sizes follow from the ratios, the presses and quantizers run with their
defaults. A peer that cannot install or run is one row of the table saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HELDOUT = ROOT / "tools" / "train" / "heldout.txt"
CONTEXT, PREFIX = 256, 192
PRESSES = {"knorm": "KnormPress", "streaming_llm": "StreamingLLMPress", "snapkv": "SnapKVPress",
           "expected_attention": "ExpectedAttentionPress", "tova": "TOVAPress"}
QUANT = [("quanto", 4), ("quanto", 2), ("hqq", 4), ("hqq", 2)]
NUMBER_BYTES = 2  # the reference cache's bytes per number
POSITION_BYTES = 4  # an int32 position per token and rotary key-latent layer
SCALE_BYTES = 2  # a float16 scale


# ------------------------------------------------------------------------------------------------ contexts


def contexts(tok, n: int, calib: list[str]) -> list[list[int]]:
    """``n`` consecutive 256-token windows of heldout.txt, from the line after the last shipped calibration
    paragraph on (so no scored token was calibrated on)."""
    lines = HELDOUT.read_text(encoding="utf-8").splitlines()
    stripped = [ln.strip() for ln in lines]
    last = max(i for i, ln in enumerate(stripped) if ln in set(calib))
    text = "\n".join(lines[last + 1:])
    assert not any(c in text for c in calib), "a calibration paragraph is in the scored text"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * CONTEXT:
        sys.exit(f"heldout.txt gives {len(ids) // CONTEXT} contexts of {CONTEXT} tokens after the calibration "
                 f"paragraphs, not {n}")
    return [ids[i * CONTEXT:(i + 1) * CONTEXT] for i in range(n)]


# ------------------------------------------------------------------------------------------------ measuring


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0]) * 1024
    return out


SKIP = {"latents", "_ready", "codec", "rotary", "pending", "owner", "quantizer", "optimizer", "_pending_beam_idx"}


def held_bytes(cache, number_bytes: dict | None = None) -> int:
    """Bytes of the distinct tensors the cache layers hold (tuples, lists, dicts and tensor subclasses such as
    quanto's followed; a LatentCache's factors and rotary tables left out): float32/float64 tensors at
    ``NUMBER_BYTES`` a number, others at their own element size. ``number_bytes``: {attribute name: bytes a number}
    overriding that (the FP8-rounded latents)."""
    import torch

    number_bytes = number_bytes or {}
    seen, total = set(), 0
    stack = [(v, key) for layer in cache.layers for key, v in vars(layer).items() if key not in SKIP]
    while stack:
        x, name = stack.pop()
        if isinstance(x, torch.Tensor):
            if type(x) is not torch.Tensor and hasattr(x, "__tensor_flatten__"):  # quanto's packed tensors
                inner, _ = x.__tensor_flatten__()
                stack.extend((getattr(x, a), name) for a in inner)
                continue
            if x.numel() and (x.data_ptr(), x.numel()) not in seen:
                seen.add((x.data_ptr(), x.numel()))
                if name in number_bytes:
                    size = number_bytes[name]
                elif x.dtype in (torch.float32, torch.float64):
                    size = NUMBER_BYTES
                else:
                    size = x.element_size()
                total += x.numel() * size
        elif isinstance(x, (tuple, list)):
            stack.extend((y, name) for y in x)
        elif isinstance(x, dict):
            stack.extend((y, name) for y in x.values())
    return total


def teacher_forced(model, ids, cache, prefix: int, during_prefill=contextlib.nullcontext, count=held_bytes):
    """(log-probabilities (N - prefix, vocab) at positions prefix-1 .. N-2, bytes held after the prefill, bytes held
    at the end): a ``prefix``-token prefill (inside ``during_prefill()``), then one token a step through ``cache``,
    every call with its true positions."""
    import torch

    out = []
    with torch.no_grad():
        with during_prefill():
            out.append(model(ids[:, :prefix], past_key_values=cache, use_cache=True,
                             position_ids=torch.arange(prefix)[None]).logits[0, -1:])
        after_prefill = count(cache)
        for t in range(prefix, ids.shape[1] - 1):
            out.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True,
                             position_ids=torch.tensor([[t]])).logits[0, -1:])
    return torch.log_softmax(torch.cat(out).double(), dim=-1), after_prefill, count(cache)


def compare(ref: list, got: list, ids: list) -> dict:
    """KL(ref || got) mean, top-1 agreement and both perplexities of the true next tokens."""
    kl, top, nll_ref, nll, n = 0.0, 0, 0.0, 0.0, 0
    for a, b, x in zip(ref, got, ids):
        target = x[0, PREFIX:]
        kl += float((a.exp() * (a - b)).sum())
        top += int((a.argmax(-1) == b.argmax(-1)).sum())
        nll_ref -= float(a.gather(1, target[:, None]).sum())
        nll -= float(b.gather(1, target[:, None]).sum())
        n += a.shape[0]
    return {"kl_mean": kl / n, "top1_agreement": top / n, "ppl_ref": math.exp(nll_ref / n), "ppl": math.exp(nll / n),
            "positions": n}


def run_method(model, ids: list, ref: list | None, make, during_prefill=contextlib.nullcontext,
               count=held_bytes) -> dict:
    """One method over every context: its scores against ``ref`` (None: this is the reference), bytes per token,
    wall time and peak RSS growth of the prefill + scoring passes."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed by the last method goes back to the system
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from the RSS now
    before = _status()["VmRSS"]
    t0 = time.perf_counter()
    got, pre, end = [], 0, 0
    for x in ids:
        cache = make()
        lp, b_pre, b_end = teacher_forced(model, x, cache, PREFIX, during_prefill, count)
        got.append(lp)
        pre, end = pre + b_pre, end + b_end
        del cache
    wall = time.perf_counter() - t0
    peak = _status()["VmHWM"] - before
    row = {"bytes_per_token": pre / (len(ids) * PREFIX), "end_bytes_per_token": end / (len(ids) * (CONTEXT - 1)),
           "wall_s": wall, "peak_rss_mib": max(peak, 0) / 2 ** 20}
    if ref is None:
        return {**row, "logprobs": got}
    return {**row, **compare(ref, got, ids)}


def warm_up(model, ids: list) -> None:
    """One uncompressed pass over the first context, so no method pays for first-call costs (lazy imports, kernel
    choices, pages of the weights)."""
    from transformers import DynamicCache

    teacher_forced(model, ids[0], DynamicCache(config=model.config), PREFIX)


def load(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32).eval()
    ids = [torch.tensor([c]) for c in spec["contexts"]]
    warm_up(model, ids)
    return model, ids


def original_bytes(config) -> int:
    """Bytes per token of the uncompressed 2-byte cache: keys and values of every layer."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * hd * NUMBER_BYTES


# ------------------------------------------------------------------------------------------------ headlens latents


class Fitted:
    """The model and its full-size data-aware value and key latents (every later size is a cut of these)."""

    def __init__(self, embedded: str, threads: int):
        import headlens as hl
        from headlens.io.embedded import default_texts

        texts = default_texts(embedded)
        cfg = hl.CompressConfig(ks=[0], latents="data-aware", keys="data-aware")  # sizes set below
        t0 = time.perf_counter()
        self.shape = hl.ModelSource(embedded=embedded).checkpoint().shape
        cfg.ks, cfg.key_ks = [self.shape.head_dim], [self.shape.head_dim]  # full size: cut later to any size
        # the eval texts only satisfy run_compress (it measures what it fits); two short ones keep that cheap
        r = hl.run_compress(hl.ModelSource(embedded=embedded), cfg, texts.eval[:2], texts.calib, keep_model=True)
        self.seconds = time.perf_counter() - t0
        self.model, self.ck, self.tokenizer, plans, key_plans = r.kept
        self.calib = list(texts.calib)
        self.sensitivity = None  # the greedy allocation's lambdas, measured once on the calibration texts
        both = [i for i, c in enumerate(r.configurations) if c.part == "both"]
        self.values, self.keys = plans[both[0]], key_plans[both[0]]
        self.calibration_tokens = r.calibration_tokens
        self.rotary = {layer: bool(p.rotary) for layer, p in self.keys.items()}

    def cache(self, value_ks: dict, key_ks: dict):
        """A fresh LatentCache with these sizes ({layer: [k per kv group]})."""
        from headlens.compress.allocate import cut_all
        from headlens.compress.cache import LatentCache
        from headlens.compress.keys import cut_keys

        plans = cut_all(self.values, value_ks)
        keys = {layer: cut_keys(self.keys[layer], key_ks[layer]).cache_latents() for layer in key_ks}
        return LatentCache.from_plans(self.model, self.ck, list(plans.values()), absorbed=False, key_latents=keys)


def uniform_allocation(fit: Fitted, budget: float, number_bytes: float, token_bytes: float):
    """One k per kv group for the values and one for the keys, the largest whose bytes per token fit ``budget``:
    per layer ``G (k_v + k_k) number_bytes`` plus ``token_bytes`` (scales) plus the positions of a rotary key layer;
    values get the odd dimension. Returns (sizes description, factory of fresh caches)."""
    s = fit.shape
    L, G = s.num_layers, s.num_kv_heads
    fixed = sum(POSITION_BYTES if fit.rotary[layer] else 0 for layer in range(L)) + L * token_bytes
    dims = int((budget - fixed) // (L * G * number_bytes))  # k_v + k_k per kv group
    kv, kk = (dims + 1) // 2, dims // 2
    if kk < 1:
        raise ValueError(f"{budget:.0f} bytes a token leave {dims} latent dims a kv group: no key latent fits")
    vks = {layer: [kv] * G for layer in range(L)}
    kks = {layer: [kk] * G for layer in range(L)}
    return f"k_v={kv}, k_k={kk}", lambda: fit.cache(vks, kks)


def greedy_allocation(fit: Fitted, budget: float, number_bytes: float, token_bytes: float):
    """compress's ``--allocate greedy``: the numbers the budget leaves (positions and scales taken off), each to the
    (layer, kv group, keys or values) latent with the largest predicted loss reduction, ``lambda sigma^2``, lambda
    per layer and part measured on the calibration texts at half size (once) and again where the first allocation
    cut (per budget): :func:`headlens.compress.allocation.refined_greedy`."""
    from headlens.compress.allocation import probe_sensitivities, refined_greedy, slots_of, split

    s = fit.shape
    L = s.num_layers
    fixed = sum(POSITION_BYTES if fit.rotary[layer] else 0 for layer in range(L)) + L * token_bytes
    total = int((budget - fixed) // number_bytes)
    slots = slots_of(fit.values, fit.keys)
    if total < sum(1 for x in slots if x.part == "keys"):
        raise ValueError(f"{budget:.0f} bytes a token leave {total} latent numbers: not one a key latent")
    def probe(at=None):
        return probe_sensitivities(fit.model, fit.ck, fit.tokenizer, fit.calib, fit.values, fit.keys, 2,
                                   disable=True, at=at)

    if fit.sensitivity is None:
        fit.sensitivity = probe()
    vks, kks = split(refined_greedy(slots, total, s.head_dim, fit.sensitivity, probe))
    return f"{total} numbers", lambda: fit.cache(vks, kks)


# allocation name -> function(fitted, bytes-per-token budget, bytes a number, extra bytes a token and layer)
# returning (description, factory of a fresh LatentCache at that budget)
ALLOCATIONS = {"uniform": uniform_allocation, "greedy": greedy_allocation}


def fp8_latents(cache):
    """Round every latent the LatentCache stores through float8_e4m3fn, one float16 scale per token and slot (keys
    or values of a layer); returns the cache and the counter of scales stored."""
    import torch

    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    scales = {"n": 0}

    def rounded(encode):
        def enc(states):
            c = encode(states)  # [batch, 1, tokens, sum_g k_g]
            scale = (c.abs().amax(-1, keepdim=True).float() / fp8_max).clamp(min=2 ** -24)
            scale = scale.to(torch.float16).float()
            scales["n"] += scale.numel()
            return ((c.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(c.dtype)
        return enc

    for layer in cache.layers:
        if hasattr(layer, "encode"):  # value latents
            layer.encode = rounded(layer.encode)
        if hasattr(layer, "codec"):  # key latents
            layer.codec.encode = rounded(layer.codec.encode)
    return cache, scales


def headlens_worker(spec: dict) -> dict:
    """Reference, latents and latent+FP8 at each ratio, transformers' FP8 cache."""
    import torch
    from transformers import DynamicCache, QuantizedCache

    torch.set_num_threads(spec["threads"])
    fit = Fitted(spec["model"], spec["threads"])
    model = fit.model
    ids = [torch.tensor([c]) for c in spec["contexts"]]
    warm_up(model, ids)
    full = original_bytes(model.config)
    L = fit.shape.num_layers
    rows = []
    ref = run_method(model, ids, None, lambda: DynamicCache(config=model.config))
    lps = ref.pop("logprobs")
    rows.append({"method": "DynamicCache (reference)", "family": "reference", "ratio": 1.0, **ref,
                 **compare(lps, lps, ids)})
    for ratio, name, (fam, nb, tb) in itertools.product(spec["ratios"], spec["allocation"],
                                                         (("latent", NUMBER_BYTES, 0), ("latent+fp8", 1, 2 * SCALE_BYTES))):
        try:
            sizes, factory = ALLOCATIONS[name](fit, ratio * full, nb, tb)
        except ValueError as exc:
            rows.append({"method": f"{fam} {name}", "family": fam, "ratio": ratio, "error": str(exc)})
            continue
        if fam == "latent":
            def make():
                return factory()
            count = held_bytes
        else:
            counters = []

            def make():
                cache, scales = fp8_latents(factory())
                counters.append(scales)
                return cache

            def count(cache):
                n = counters[-1]["n"]
                return held_bytes(cache, {"keys": 1, "values": 1}) + n * SCALE_BYTES
        row = run_method(model, ids, lps, make, count=count)
        rows.append({"method": f"{fam} {name} ({sizes})", "family": fam, "ratio": ratio, **row})
        print(f"[{spec['model']}] {rows[-1]['method']} @ {ratio}: KL {row['kl_mean']:.4f}, "
              f"{row['bytes_per_token']:.0f} B/token", file=sys.stderr, flush=True)
    row = run_method(model, ids, lps, lambda: QuantizedCache(backend="fp8", config=model.config))
    rows.append({"method": "fp8 (transformers QuantizedCache)", "family": "quantized", "ratio": 0.5, **row})
    return {"rows": rows, "original_bytes_per_token": full, "fit_seconds": fit.seconds,
            "calibration_tokens": fit.calibration_tokens, "layers": L}


# ------------------------------------------------------------------------------------------------ peers


def quant_worker(spec: dict) -> dict:
    """transformers' QuantizedCache with the quanto and HQQ backends that import here."""
    from transformers import DynamicCache, QuantizedCache

    model, ids = load(spec)
    ref = run_method(model, ids, None, lambda: DynamicCache(config=model.config))
    lps = ref.pop("logprobs")
    rows = []
    for backend, nbits in QUANT:
        name = f"{backend} int{nbits} (transformers QuantizedCache)"
        try:
            row = run_method(model, ids, lps, lambda: QuantizedCache(backend=backend, config=model.config,
                                                                     nbits=nbits))
        except Exception as exc:  # noqa: BLE001 -- a backend that cannot run is one row saying why
            rows.append({"method": name, "family": "quantized", "ratio": nbits / 16,
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})
            continue
        rows.append({"method": name, "family": "quantized", "ratio": nbits / 16, **row})
        print(f"[{spec['model']}] {name}: KL {row['kl_mean']:.4f}", file=sys.stderr, flush=True)
    return {"rows": rows}


def kvpress_worker(spec: dict) -> dict:
    """kvpress presses at compression_ratio = 1 - ratio, applied during the prefill."""
    import kvpress
    import kvpress.utils
    from transformers import DynamicCache

    notes = [f"kvpress {metadata.version('kvpress')} with transformers {metadata.version('transformers')}"]
    model, ids = load(spec)
    if type(model).__name__ == "Qwen3MoeForCausalLM":
        # kvpress applies Qwen3's query norm (q_norm) only to Qwen3Attention; Qwen3-MoE's attention is the same
        # module under another class, so it is named there too (else the presses that read queries skip the norm)
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention

        kvpress.utils.Qwen3Attention = (Qwen3Attention, Qwen3MoeAttention)
        notes.append("tiny-moe (Qwen3MoeForCausalLM) is not among kvpress's tested models; its Qwen3 q_norm check "
                     "was extended to Qwen3MoeAttention here")
    ref = run_method(model, ids, None, lambda: DynamicCache(config=model.config))
    lps = ref.pop("logprobs")
    rows = []
    for ratio in spec["ratios"]:
        for short, cls in PRESSES.items():
            name = f"kvpress {short}"
            try:
                press = getattr(kvpress, cls)(compression_ratio=1 - ratio)
                row = run_method(model, ids, lps, lambda: DynamicCache(config=model.config),
                                 during_prefill=lambda: press(model))
            except Exception as exc:  # noqa: BLE001 -- a press that cannot run is one row saying why
                rows.append({"method": name, "family": "eviction", "ratio": ratio,
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})
                continue
            rows.append({"method": name, "family": "eviction", "ratio": ratio, **row})
            print(f"[{spec['model']}] {name} @ {ratio}: KL {row['kl_mean']:.4f}", file=sys.stderr, flush=True)
    return {"rows": rows, "notes": notes}


WORKERS = {"headlens": headlens_worker, "quant": quant_worker, "kvpress": kvpress_worker}


# ------------------------------------------------------------------------------------------------ throwaway venvs


def child_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           **(extra or {})}
    return env


def last_error(out: str) -> str:
    lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def _imports(py: str, module: str) -> tuple[bool, str]:
    try:
        r = subprocess.run([py, "-c", f"import {module}"], capture_output=True, text=True, env=child_env(),
                           timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return r.returncode == 0, last_error(r.stderr)


# venv -> (pinned to this environment's versions, packages installed one by one as (pip name, module))
VENVS = {"quant": (("torch", "transformers", "numpy"), [("optimum-quanto", "optimum.quanto"), ("hqq", "hqq")]),
         "kvpress": (("torch", "numpy"), [("kvpress", "kvpress")])}


def peer_python(which: str, root: Path | None) -> tuple[str | None, dict[str, str]]:
    """(interpreter of the throwaway venv ``root/which``, {module: "" if importable else why not}). The venv sees
    this environment's packages through a .pth (torch above all, pinned so pip does not pull another); what it
    installs shadows them there (kvpress's transformers < 5.3), never here."""
    pins, packages = VENVS[which]
    if root is None:
        return None, {m: "not installed here; pass --venvs DIR to install it into a throwaway venv" for _, m in
                      packages}
    venv = root / which
    py = venv / "bin" / "python"
    status: dict[str, str] = {}
    if not py.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
            site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip()
            here = sysconfig.get_paths()["purelib"]
            Path(site, "_bench_parent_env.pth").write_text(f"import site; site.addsitedir({here!r})\n")
            (venv / "pins.txt").write_text("".join(f"{p}=={metadata.version(p)}\n" for p in pins))
        except (subprocess.CalledProcessError, OSError) as exc:
            return None, {m: f"could not create the throwaway venv {venv}: {exc}" for _, m in packages}
    for pip_name, module in packages:
        ok, why = _imports(str(py), module)
        if ok:
            status[module] = ""
            continue
        t0 = time.perf_counter()
        print(f"installing {pip_name} into the throwaway venv {venv} ...", flush=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(venv / "pins.txt"), pip_name],
                           capture_output=True, text=True, timeout=1800, env=child_env({"DISABLE_CUDA": "1"}))
        (venv / f"pip-{pip_name}.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            status[module] = f"pip install {pip_name} failed: {last_error(r.stdout + r.stderr)}"
            continue
        ok, why = _imports(str(py), module)
        status[module] = "" if ok else f"{pip_name} installed but `import {module}` fails: {why}"
        print(f"  {pip_name}: {'ok' if ok else status[module]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return str(py), status


# ------------------------------------------------------------------------------------------------ the driver


def run_worker(py: str, which: str, spec: dict) -> dict:
    env = child_env({"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
    r = subprocess.run([py, __file__, "--worker", which], input=json.dumps(spec), capture_output=True, text=True,
                       env=env)
    sys.stderr.write(r.stderr[-4000:] if r.returncode else "".join(
        ln + "\n" for ln in r.stderr.splitlines() if ln.startswith("[")))
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"the {which} worker failed (exit {r.returncode}): {last_error(r.stderr)}"}


def failed_rows(which: str, why: str, ratios: list[float], status: dict | None = None) -> list[dict]:
    """One row per peer that did not run, saying why."""
    if which == "quant":
        return [{"method": f"{b} int{'/int'.join(str(n) for bb, n in QUANT if bb == b)} (transformers "
                 "QuantizedCache)", "family": "quantized", "ratio": 0.25,
                 "error": (status or {}).get("optimum.quanto" if b == "quanto" else "hqq") or why}
                for b in ("quanto", "hqq")]
    return [{"method": f"kvpress ({', '.join(PRESSES)})", "family": "eviction", "ratio": max(ratios), "error": why}]


def table(model: str, res: dict) -> list[str]:
    full = res["original_bytes_per_token"]
    lines = [f"### {model}: {res['contexts']} contexts x {CONTEXT - PREFIX} scored tokens after a {PREFIX}-token "
             f"prefix; original cache {full} bytes/token (2 bytes a number)", "",
             "| target | method | KV bytes/token (prefix) | % of original | end bytes/token | KL (nats) | top-1 | "
             "perplexity | wall s | peak RSS MiB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"reference": 0, "latent": 1, "latent+fp8": 2, "quantized": 3, "eviction": 4}
    rows = sorted(res["rows"], key=lambda r: (-r["ratio"], order[r["family"]]))
    for r in rows:
        target = f"{100 * r['ratio']:g}%"
        if "error" in r:
            lines.append(f"| {target} | {r['method']} | not run: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {target} | {r['method']} | {r['bytes_per_token']:.0f} | "
                     f"{100 * r['bytes_per_token'] / full:.1f}% | {r['end_bytes_per_token']:.0f} | "
                     f"{r['kl_mean']:.4f} | {100 * r['top1_agreement']:.1f}% | {r['ppl_ref']:.2f} -> {r['ppl']:.2f} | "
                     f"{r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    return lines


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    style = {"latent": ("o", "-"), "latent+fp8": ("s", "-"), "quantized": ("^", ""), "eviction": ("x", "--")}
    for ax, (model, res) in zip(axes[0], results.items()):
        full = res["original_bytes_per_token"]
        series: dict[str, list] = {}
        for r in res["rows"]:
            if "error" in r or r["family"] == "reference":
                continue
            name = r["method"].split(" (")[0] if r["family"].startswith("latent") else r["method"].replace(
                " (transformers QuantizedCache)", "")
            if r["family"] == "quantized":
                name = name.split(" int")[0] if not name.startswith("fp8") else name
            series.setdefault(name, []).append((r["bytes_per_token"] / full, max(r["kl_mean"], 1e-6), r["family"]))
        for name, pts in series.items():
            pts.sort()
            marker, line = style[pts[0][2]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=line or "none", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("KV bytes per token (prefix), fraction of the 2-byte cache")
        ax.set_ylabel("next-token KL vs uncompressed (nats)")
        ax.set_title(f"{model}: {res['contexts']} x 64 scored tokens")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-lm,tiny-moe", help="embedded decoders (default tiny-lm,tiny-moe)")
    ap.add_argument("--contexts", type=int, default=8, help="256-token contexts per model (default 8)")
    ap.add_argument("--ratios", default="0.5,0.25,0.125", help="KV bytes per token as fractions of the original")
    ap.add_argument("--allocation", default="uniform,greedy",
                    help=f"latent sizes, comma-separated among {', '.join(sorted(ALLOCATIONS))} (default uniform,greedy)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--venvs", type=Path, default=Path("/tmp/headlens-kv-peers-venvs"),
                   help="throwaway venvs for the peers (quanto+HQQ, kvpress): used if there, created otherwise "
                        "(default /tmp/headlens-kv-peers-venvs)")
    g.add_argument("--no-install", action="store_true", help="install no peer: their rows say not installed")
    ap.add_argument("--only", default="headlens,quant,kvpress", help="which workers run (default all three)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    ap.add_argument("--json", type=Path, help="write everything measured here")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="where the figure goes (default bench/out)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](json.loads(sys.stdin.read()))))
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoTokenizer

    from headlens.io.embedded import default_texts, embedded_dir

    ratios = [float(x) for x in args.ratios.split(",")]
    allocations = [a for a in args.allocation.split(",") if a]
    unknown = [a for a in allocations if a not in ALLOCATIONS]
    if unknown or not allocations:
        ap.error(f"--allocation {args.allocation}: choose among {', '.join(sorted(ALLOCATIONS))}")
    only = args.only.split(",")
    t0 = time.perf_counter()
    pythons: dict[str, tuple[str | None, dict]] = {"headlens": (sys.executable, {})}
    for which in ("quant", "kvpress"):
        if which in only:
            pythons[which] = peer_python(which, None if args.no_install else args.venvs)
    results: dict[str, dict] = {}
    for model in args.models.split(","):
        directory = embedded_dir(model)
        tok = AutoTokenizer.from_pretrained(str(directory))
        ctx = contexts(tok, args.contexts, default_texts(model).calib)
        spec = {"model": model, "dir": str(directory), "contexts": ctx, "ratios": ratios, "threads": args.threads,
                "allocation": allocations}
        from transformers import AutoConfig

        res: dict = {"rows": [], "contexts": len(ctx), "notes": [], "installs": {},
                     "original_bytes_per_token": original_bytes(AutoConfig.from_pretrained(str(directory)))}
        for which in only:
            py, status = pythons[which]
            if which == "quant":
                res["installs"].update(status)
                missing = [m for m, why in status.items() if why]
                if py is None or len(missing) == len(status):
                    res["rows"] += failed_rows(which, "no venv", ratios, status)
                    continue
            if which == "kvpress":
                res["installs"].update(status)
                if py is None or status.get("kvpress"):
                    res["rows"] += failed_rows(which, status.get("kvpress", "no venv"), ratios)
                    continue
            t = time.perf_counter()
            out = run_worker(py, which, spec)
            print(f"[{model}] {which} worker: {time.perf_counter() - t:.0f} s", flush=True)
            if "error" in out:
                if which == "headlens":
                    sys.exit(out["error"])
                res["rows"] += failed_rows(which, out["error"], ratios)
                continue
            if which == "quant":  # a backend that did not install: its rows say why
                for r in out["rows"]:
                    mod = "optimum.quanto" if r["method"].startswith("quanto") else "hqq"
                    if "error" in r and status.get(mod):
                        r["error"] = status[mod]
            res["rows"] += out["rows"]
            res["notes"] += out.get("notes", [])
            for key in ("original_bytes_per_token", "fit_seconds", "calibration_tokens", "layers"):
                if key in out:
                    res[key] = out[key]
        results[model] = res
    lines = [f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_kv_peers.py --models {args.models} "
             f"--contexts {args.contexts} --ratios {args.ratios} --threads {args.threads}`", ""]
    for model, res in results.items():
        lines += table(model, res)
        lines += [f"- {n}" for n in res["notes"]]
        if "fit_seconds" in res:
            lines.append(f"- latents fitted in {res['fit_seconds']:.0f} s on {res['calibration_tokens']} calibration "
                         "tokens (the shipped calibration texts; run_compress, its measurement included)")
        lines += [f"- {m}: {why}" for m, why in res["installs"].items() if why] + [""]
    lines.append(f"total {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": ratios, "prefix": PREFIX, "context": CONTEXT,
                                         "allocation": allocations, "command": lines[0]}, indent=1) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    fig = args.out / "kv_peers.png"
    figure(results, fig)
    print(f"figure: {fig}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
