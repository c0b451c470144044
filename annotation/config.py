"""The Label Studio labeling configuration of a landmark-box campaign.

Raters draw at most one ``RectangleLabels`` box labelled ``landmark`` around the most prominent
landmark of each image, or tick the ``Choices`` flag ``no prominent landmark`` (the paper's raters
discarded ~8% of the images that way). The names below are the contract between the config, the
pre-annotations we import and the export we parse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from xml.sax.saxutils import quoteattr

__all__ = [
    "BOX_FROM_NAME",
    "DEFAULT_INSTRUCTIONS",
    "FLAG_FROM_NAME",
    "IMAGE_NAME",
    "LANDMARK_LABEL",
    "NO_LANDMARK_CHOICE",
    "box_to_rect_value",
    "labeling_config",
    "rect_value_to_edges",
]

IMAGE_NAME = "image"  # <Image name=...> and the task data key holding the image URL
BOX_FROM_NAME = "box"  # <RectangleLabels name=...>
FLAG_FROM_NAME = "flag"  # <Choices name=...>
LANDMARK_LABEL = "landmark"
NO_LANDMARK_CHOICE = "no prominent landmark"

DEFAULT_INSTRUCTIONS = (
    "Draw ONE box around the most prominent landmark (building, monument, natural landmark) "
    "in the image: tight around its visible extent, including parts hidden behind small "
    "occluders. If a suggested box is shown, keep it when it is right, move or resize it when "
    "it is close, delete it when it is wrong. If no landmark is prominent (indoor scene, "
    "people, objects, a landmark too small or too cut to recognise), draw nothing and tick "
    "'no prominent landmark'."
)


def labeling_config(instructions: str = DEFAULT_INSTRUCTIONS) -> str:
    """The XML labeling config: an image, one ``landmark`` rectangle at most, the no-landmark flag.

    Args:
        instructions: shown above the image (plain text; escaped here).

    Returns:
        The ``<View>`` XML string for ``projects.create(label_config=...)``.
    """
    if not instructions.strip():
        raise ValueError("labeling_config: instructions must not be empty")
    return (
        "<View>\n"
        f"  <Header value={quoteattr('Box the most prominent landmark')}/>\n"
        f'  <Header value={quoteattr(instructions)} size="6" underline="false"/>\n'
        f'  <Image name="{IMAGE_NAME}" value="${IMAGE_NAME}" zoom="true" rotateControl="false"/>\n'
        f'  <RectangleLabels name="{BOX_FROM_NAME}" toName="{IMAGE_NAME}" canRotate="false">\n'
        f'    <Label value="{LANDMARK_LABEL}" background="#e6194b" maxUsages="1"/>\n'
        "  </RectangleLabels>\n"
        f'  <Choices name="{FLAG_FROM_NAME}" toName="{IMAGE_NAME}" choice="single" '
        'showInline="true">\n'
        f'    <Choice value="{NO_LANDMARK_CHOICE}"/>\n'
        "  </Choices>\n"
        "</View>\n"
    )


def box_to_rect_value(ymin: float, xmin: float, ymax: float, xmax: float) -> dict[str, Any]:
    """A normalised box as the ``value`` of a Label Studio rectangle (percent of the image).

    Label Studio stores ``x, y`` (top-left corner), ``width, height`` in percent of
    ``original_width/original_height``.
    """
    return {
        "x": 100.0 * xmin,
        "y": 100.0 * ymin,
        "width": 100.0 * (xmax - xmin),
        "height": 100.0 * (ymax - ymin),
        "rotation": 0,
        "rectanglelabels": [LANDMARK_LABEL],
    }


def rect_value_to_edges(value: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """``(ymin, xmin, ymax, xmax)`` in [0, 1] units (not clipped) from a rectangle ``value``.

    Raises:
        ValueError: a missing or non-numeric ``x/y/width/height``, or a rotated rectangle.
    """
    try:
        x, y = float(value["x"]), float(value["y"])
        w, h = float(value["width"]), float(value["height"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"rectangle value {dict(value)!r} lacks numeric x/y/width/height") from exc
    if abs(float(value.get("rotation", 0) or 0)) > 1e-6:
        raise ValueError(f"rectangle value {dict(value)!r} is rotated; boxes must be axis-aligned")
    return y / 100.0, x / 100.0, (y + h) / 100.0, (x + w) / 100.0
