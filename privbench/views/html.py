"""Jinja2 rendering for the HTML views: templates from privbench/templates, autoescape always on."""

from __future__ import annotations

from typing import Any


def environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("privbench", "templates"),
                             autoescape=True,  # every template, whatever its extension: store text is escaped
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)
