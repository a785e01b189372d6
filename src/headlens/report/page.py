"""What every self-contained headlens page shares: escaping, the style sheet, inlined figures, the model's name.

No external resource and no script: a page works offline and from an e-mail attachment.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Mapping

from headlens.errors import HeadlensError

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:2px 7px;text-align:right;white-space:nowrap}
th{background:#f3f4f6;position:sticky;top:0;white-space:normal;vertical-align:bottom;max-width:11em}
td.l,th.l{text-align:left}
tbody tr:nth-child(even){background:#fafafa}
.scroll{overflow:auto;max-height:80vh;border:1px solid #eee}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
details{margin:.8em 0}summary{cursor:pointer;font-weight:600}
.note{color:#555;font-size:.9em}
table.kv td{text-align:left;white-space:normal}table.kv th{max-width:none;position:static}
"""

MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
        ".svg": "image/svg+xml", ".webp": "image/webp"}


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def image_tag(path: Path, captions: Mapping[str, str]) -> str:
    """A ``<figure>`` with the image inlined as a data URI and its caption (``captions[name]``, else the name)."""
    path = Path(path)
    mime = MIME.get(path.suffix.lower())
    if mime is None:
        raise HeadlensError(f"cannot embed {path}: not an image type the page knows ({', '.join(MIME)})")
    try:
        from headlens.io.files import readable  # the figure is staged until the command ends

        data = readable(path).read_bytes()
    except OSError as exc:
        raise HeadlensError(f"cannot read image {path}: {exc.strerror or exc}") from None
    caption = captions.get(path.name, path.name)
    b64 = base64.b64encode(data).decode("ascii")
    return (f"<figure><img src=\"data:{mime};base64,{b64}\" alt=\"{escape(caption)}\">"
            f"<figcaption>{escape(caption)} <code>{escape(path.name)}</code></figcaption></figure>")


def model_name(summary: dict) -> str:
    """The page title's model: ``summary["model"]`` (a string, or a dict with ``name``), else a fallback."""
    for key in ("model", "model_name", "name", "hf_repo", "weights"):
        value = summary.get(key)
        if isinstance(value, dict):
            value = next((value[k] for k in ("name", "model_name", "hf_repo", "source") if value.get(k)), None)
        if value:
            return str(value)
    return "model"
