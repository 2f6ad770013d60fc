"""Icons (lucide, inline SVG) and the number formats the cards use."""

import math

from django import template
from django.utils.html import format_html
from django.utils.safestring import mark_safe

register = template.Library()

LUCIDE = {
    "cpu": '<rect width="16" height="16" x="4" y="4" rx="2"/><rect width="6" height="6" x="9" y="9" rx="1"/>'
    '<path d="M15 2v2"/><path d="M15 20v2"/><path d="M2 15h2"/><path d="M2 9h2"/><path d="M20 15h2"/>'
    '<path d="M20 9h2"/><path d="M9 2v2"/><path d="M9 20v2"/>',
    "download": '<path d="M21 15v4a2 2 0 0 1-2 2H5a2 2 0 0 1-2-2v-4"/><polyline points="7 10 12 15 17 10"/>'
    '<line x1="12" x2="12" y1="15" y2="3"/>',
    "check-circle": '<path d="M22 11.08V12a10 10 0 1 1-5.93-9.14"/><polyline points="22 4 12 14.01 9 11.01"/>',
    "loader": '<line x1="12" x2="12" y1="2" y2="6"/><line x1="12" x2="12" y1="18" y2="22"/>'
    '<line x1="4.93" x2="7.76" y1="4.93" y2="7.76"/><line x1="16.24" x2="19.07" y1="16.24" y2="19.07"/>'
    '<line x1="2" x2="6" y1="12" y2="12"/><line x1="18" x2="22" y1="12" y2="12"/>'
    '<line x1="4.93" x2="7.76" y1="19.07" y2="16.24"/><line x1="16.24" x2="19.07" y1="7.76" y2="4.93"/>',
    "activity": '<path d="M22 12h-4l-3 9L9 3l-3 9H2"/>',
    "alert-circle": '<circle cx="12" cy="12" r="10"/><line x1="12" x2="12" y1="8" y2="12"/>'
    '<line x1="12" x2="12.01" y1="16" y2="16"/>',
    "x": '<path d="M18 6 6 18"/><path d="m6 6 12 12"/>',
    "trash-2": '<path d="M3 6h18"/><path d="M19 6v14c0 1-1 2-2 2H7c-1 0-2-1-2-2V6"/>'
    '<path d="M8 6V4c0-1 1-2 2-2h4c1 0 2 1 2 2v2"/><line x1="10" x2="10" y1="11" y2="17"/>'
    '<line x1="14" x2="14" y1="11" y2="17"/>',
    "play": '<polygon points="6 3 20 12 6 21 6 3"/>',
    "chevron-right": '<path d="m9 18 6-6-6-6"/>',
    "database": '<ellipse cx="12" cy="5" rx="9" ry="3"/><path d="M3 5V19A9 3 0 0 0 21 19V5"/>'
    '<path d="M3 12A9 3 0 0 0 21 12"/>',
}


@register.simple_tag
def icon(name: str, css: str = "w-5 h-5"):
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" class="{}" viewBox="0 0 24 24" fill="none" stroke="currentColor" '
        'stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true">{}</svg>',
        css,
        mark_safe(LUCIDE[name]),
    )


def _scaled(value, units: tuple[tuple[float, str], ...], bare_suffix: str) -> str:
    """One decimal below 10, none above: 135M, 1.1B, 270MB, 1.2GB."""
    if value in (None, ""):
        return "?"
    value = float(value)
    for limit, suffix in units:
        if value >= limit:
            scaled = value / limit
            return f"{scaled:.1f}{suffix}" if scaled < 10 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}{bare_suffix}"


@register.filter
def params(value) -> str:
    return _scaled(value, ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")), "")


@register.filter
def bytes_short(value) -> str:
    """Decimal units, as download sizes are quoted."""
    return _scaled(value, ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")), "B")


@register.filter
def duration(seconds) -> str:
    if seconds in (None, ""):
        return "–"
    seconds = int(round(float(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


@register.filter
def signed_percent(value) -> str:
    """+3.1 %, −0.4 %."""
    if value in (None, ""):
        return ""
    value = float(value)
    return f"{'+' if value >= 0 else '−'}{abs(value):.1f} %"


@register.filter
def get_item(mapping, key):
    return mapping.get(key) if mapping else None


@register.filter
def thousands(value) -> str:
    """12,105,137: integers with thousands separators."""
    if value in (None, ""):
        return "–"
    return f"{int(round(float(value))):,}"


@register.filter
def figure(value, digits: int = 3) -> str:
    """A measured float for a table: `digits` significant figures, thousands separated,
    scientific only beyond 10^7 or below 10^-3 (1,234.5, 0.0123, 3.1e+09)."""
    if value in (None, ""):
        return "–"
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e7 or magnitude < 1e-3:
        return f"{value:.{max(0, int(digits) - 1)}e}"
    decimals = max(0, int(digits) - 1 - math.floor(math.log10(magnitude)))
    return f"{value:,.{decimals}f}"
