"""MkDocs hooks for the API reference (mkdocs.yml loads this file; docs-build code only).

1. Let mkdocstrings find ``segscope.app`` and ``segscope.analysis`` by static analysis. The
   packages live in the folders ``app/`` and ``analysis/`` and install as ``segscope.app`` and
   ``segscope.analysis`` through setuptools' ``package-dir`` mapping, so no folder named
   ``segscope`` exists for griffe (mkdocstrings' loader) to find. Before the build,
   :func:`on_config` makes ``build/docs-src/segscope/{app,analysis}``, links to those folders,
   which ``mkdocs.yml`` gives mkdocstrings as its search path. Nothing is imported: the API
   pages are built from the source.
2. Turn the docstrings' Sphinx roles into cross-references (:func:`on_page_content`).
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

from mkdocs.plugins import event_priority

#: Folder of the checkout (beside mkdocs.yml) -> name under ``segscope``.
PACKAGES = {"app": "app", "analysis": "analysis"}
#: Where the link tree is made, relative to mkdocs.yml (``build/`` is ignored by git).
SHIM = Path("build") / "docs-src" / "segscope"


@event_priority(100)  # before mkdocstrings reads its search paths (it drops missing ones)
def on_config(config, **kwargs):
    """Create (or repair) the ``segscope`` link tree before mkdocstrings loads any module."""
    root = Path(config.config_file_path).resolve().parent
    shim = root / SHIM
    shim.mkdir(parents=True, exist_ok=True)
    for name, folder in PACKAGES.items():
        link = shim / name
        target = os.path.relpath(root / folder, shim)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return config


# Sphinx roles in docstrings -------------------------------------------------------------------
#
# The docstrings cross-reference with Sphinx roles (":class:`~segscope.app.jobs.JobRunner`"),
# which Markdown leaves as ":class:" before a code span. On the API pages each role becomes
# an *optional* autorefs link: a link when the target is documented in this site, plain code
# otherwise (optional references never warn, so a role naming an undocumented or private object
# cannot fail the strict build). Names without a dot are looked up in the page's module.

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):"
    r"<code>(?P<text>[^<]*)</code>"
)
_EXPLICIT_TITLE = re.compile(r"^(?P<title>.*?)\s*&lt;(?P<target>[^&]+)&gt;$")


def _page_module(src_uri: str) -> str | None:
    """``api/analysis/volume.md`` -> ``segscope.analysis.volume`` (None outside ``api/``)."""
    parts = Path(src_uri).with_suffix("").parts
    if len(parts) < 3 or parts[0] != "api":
        return None
    return ".".join(("segscope", *parts[1:]))


def _role_link(match: re.Match, module: str | None) -> str:
    text = match["text"]  # HTML-escaped already: it is a rendered code span
    explicit = _EXPLICIT_TITLE.match(text)
    if explicit:
        title, target = explicit["title"], explicit["target"]
    else:
        target = text.lstrip("~")
        title = target.rsplit(".", 1)[-1] if text.startswith("~") else target
    target = target.rstrip("()")
    if not target.startswith("segscope.") and module is not None:
        target = f"{module}.{target}"
    return f'<autoref identifier="{html.escape(target)}" optional><code>{title}</code></autoref>'


def on_page_content(content, page, **kwargs):
    """Turn the Sphinx roles of the rendered docstrings into optional cross-references."""
    module = _page_module(page.file.src_uri)
    if module is None:
        return content
    return _ROLE.sub(lambda match: _role_link(match, module), content)
