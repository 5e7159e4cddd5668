"""A quick look at one sample: its image with the question's boxes drawn, question and answer as title."""

from __future__ import annotations

import textwrap

from flowlib.sample import Sample

_COLORS = ("#ff1f5b", "#00cd6c", "#009ade", "#af58ba", "#ffc61e", "#f28522")


def preview(sample: Sample, ax=None, title_width: int = 60):
    """Draw `sample`'s image with its labelled boxes; the title is the question and answer.

    Args:
        sample: any `Sample` whose image can be loaded.
        ax: matplotlib axes to draw on; None makes a new figure.
        title_width: characters per title line before wrapping.

    Returns:
        (figure, axes). Nothing is shown or saved: call `plt.show()` or `fig.savefig` yourself.

    Example:
        >>> fig, ax = preview(to_samples(world["test"])[0])
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image = sample.load_image()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 5 * image.height / image.width + 0.6))
    else:
        fig = ax.figure
    ax.imshow(image)
    for i, box in enumerate(sample.validated_boxes(image.width, image.height)):
        color = _COLORS[i % len(_COLORS)]
        ax.add_patch(Rectangle((box.x, box.y), box.w, box.h, fill=False, edgecolor=color, linewidth=2))
        if box.label:
            ax.text(
                box.x,
                box.y,
                box.label,
                color="white",
                fontsize=8,
                va="bottom",
                bbox={"facecolor": color, "edgecolor": "none", "pad": 1},
            )
    options = f" [{sample.true_option} / {sample.false_option}]" if sample.has_options else ""
    title = f"{sample.task}: {sample.question} -> {sample.answer}{options}"
    ax.set_title("\n".join(textwrap.wrap(title, title_width)), fontsize=9)
    ax.set_axis_off()
    return fig, ax
