"""Which texts ``run_compress`` measures on and fits with: the caller's, or those shipped for an embedded model.

:func:`compress_texts` is the one rule for the library and the command line: eval texts (never used to fit) are
required unless the model is an embedded one, whose shipped texts (:func:`headlens.io.embedded.default_texts`) are
used and noted; data-aware latents need calibration texts the same way; the two may not share a text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from headlens import params
from headlens.errors import HeadlensError


@dataclass
class CompressTexts:
    """The texts of a compress run and what was chosen for the caller (``notes``, parameters in backticks)."""

    eval: list[str]
    calib: list[str] | None  # None: no data-aware latent
    notes: list[str] = field(default_factory=list)


def shipped_model(source) -> str | None:
    """The embedded model ``source`` names (the default MiniLM when it names nothing), else None."""
    if source.weights is None and source.hf_repo is None:
        return source.embedded or "minilm"
    return None


def _nonempty(texts: list[str], name: str) -> list[str]:
    if not texts:
        raise HeadlensError(f"`{name}` holds no text")
    for i, t in enumerate(texts):
        if not t.strip():
            raise HeadlensError(f"`{name}` item {i} is an empty text")
    return texts


def compress_texts(source, needs_calibration: bool, eval_texts: Any = None, calib_texts: Any = None,
                   reason: str | None = None) -> CompressTexts:
    """The eval and calibration texts for a compress run on ``source``: ``eval_texts`` / ``calib_texts`` as given
    (one str is one text; see :func:`headlens.params.texts`), else, for an embedded model, the texts shipped with
    it. Calibration texts are read only when ``needs_calibration`` (``reason``: why, e.g. data-aware latents)."""
    embedded = shipped_model(source)
    notes: list[str] = []
    shipped = None
    if embedded is not None and (eval_texts is None or (needs_calibration and calib_texts is None)):
        from headlens.io.embedded import default_texts

        shipped = default_texts(embedded)
    if eval_texts is None:
        if shipped is None:
            raise HeadlensError("`eval_texts` is required (held-out texts, never used to fit): default texts ship "
                                "only for the embedded models (`model` minilm, tiny-lm or tiny-moe)")
        evals = shipped.eval
        notes.append(f"eval texts: {len(evals)} shipped for {embedded} ({shipped.eval_file.name})")
    else:
        evals = _nonempty(params.texts(eval_texts, "eval_texts"), "eval_texts")  # type: ignore[arg-type]
    calib = None
    if needs_calibration:
        if calib_texts is None:
            if shipped is None:
                if reason not in (None, "data-aware latents"):  # an allocation measured on calibration texts
                    raise HeadlensError(f"{reason} needs `calib_texts` (calibration texts), or pass `allocate` "
                                        "uniform or error")
                raise HeadlensError("data-aware latents need `calib_texts` (calibration texts), or pass `latents` "
                                    "plain")
            calib = shipped.calib
            notes.append(f"calibration texts: {len(calib)} shipped for {embedded} ({shipped.calib_file.name})")
        else:
            calib = _nonempty(params.texts(calib_texts, "calib_texts"), "calib_texts")  # type: ignore[arg-type]
        shared = set(calib) & set(evals)
        if shared:
            raise HeadlensError(f"`calib_texts` and `eval_texts` share {len(shared)} text(s): the eval texts must be "
                                "held out from the fit")
    elif calib_texts is not None:
        params.texts(calib_texts, "calib_texts")
        notes.append("`calib_texts` is not used: plain latents are fitted on the weights alone")
    return CompressTexts(evals, calib, notes)
