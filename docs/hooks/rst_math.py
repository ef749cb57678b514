"""mkdocs hook: render the docstrings' RST markup (math and cross-reference roles) on the API pages.

The API pages come from numpy-style docstrings written for Sphinx: ``:math:`x``` inline, ``.. math::``
followed by an indented block or by the formula on the same line, and roles such as ``:func:`f```.
Rendered as markdown these arrive as ``:math:<code>x</code>``, ``<p>.. math::</p><pre><code>...</code></pre>``
or ``<p>.. math:: ...</p>`` (where markdown has eaten ``\\\\`` and turned ``_x_`` into ``<em>x</em>``), and
``:func:<code>f</code>``. This hook rewrites the math to MathJax's ``\\( \\)`` and ``\\[ \\]`` delimiters
(MathJax is loaded by ``extra_javascript``; a block with ``&`` becomes an ``aligned`` environment) and
drops the role prefixes.
"""

from __future__ import annotations

import re

_CODE_BLOCK = re.compile(r"<p>\.\. math::</p>\s*<pre><code>(.*?)</code></pre>", re.S)
_PARAGRAPH = re.compile(r"<p>\.\. math::(.*?)</p>", re.S)
_INLINE = re.compile(r":math:<code>(.*?)</code>", re.S)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|ref):<code>~?(.*?)</code>")


def _display(tex: str) -> str:
    tex = tex.strip()
    if "&" in tex:  # "&" or the escaped "&amp;"
        tex = f"\\begin{{aligned}}{tex}\\end{{aligned}}"
    return f'<div class="math">\\[{tex}\\]</div>'


def _from_paragraph(tex: str) -> str:
    # markdown turned "a_{i}...b_{j}" into "a<em>{i}...b</em>{j}" and "\\" at a line end into "\"
    tex = tex.replace("<em>", "_").replace("</em>", "_")
    tex = re.sub(r"(?<!\\)\\\n", r"\\\\\n", tex)
    return _display(tex)


def rst_math_to_mathjax(html: str) -> str:
    """Rewrite rendered RST math and roles in ``html`` (see the module docstring)."""
    html = _CODE_BLOCK.sub(lambda m: _display(m.group(1)), html)
    html = _PARAGRAPH.sub(lambda m: _from_paragraph(m.group(1)), html)
    html = _INLINE.sub(lambda m: f'<span class="math">\\({m.group(1)}\\)</span>', html)
    return _ROLE.sub(lambda m: f"<code>{m.group(1)}</code>", html)


def on_page_content(html: str, **kwargs: object) -> str:
    return rst_math_to_mathjax(html)
