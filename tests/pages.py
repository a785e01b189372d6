"""Reading the interactive pages headlens writes: the plotly figure behind the inlined plotly.js."""

import json
import re


def figure_from_page(html: str):
    """(data, layout, config, frames) decoded from the page's Plotly.newPlot / Plotly.addFrames calls."""
    dec = json.JSONDecoder()

    def args_after(marker: str, count: int):
        """The JSON arguments after the first (the div id, quoted either way) of the last ``marker`` call."""
        start = html.rindex(marker) + len(marker)
        first = re.compile(r"\s*(['\"])headlens-sphere\1").match(html, start)
        assert first, html[start:start + 200]
        i, out = first.end(), []
        for _ in range(count):
            while html[i] in " \n\t,":
                i += 1
            obj, i = dec.raw_decode(html, i)
            out.append(obj)
        return out

    data, layout, config = args_after("Plotly.newPlot(", 3)
    (frames,) = args_after("Plotly.addFrames(", 1)
    return data, layout, config, frames
