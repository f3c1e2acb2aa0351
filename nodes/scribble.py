"""HyperSDScribblePreprocessor: a drawn canvas or a photo -> white-on-black scribble lines.

The math is in ``scribble_math`` (pure torch); this module is only the V3 node wrapper.
"""
from comfy_api.latest import io

from .scribble_math import POLARITIES, SOURCES, scribble_lines


class HyperSDScribblePreprocessor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperSDScribblePreprocessor",
            display_name="Hyper-SD Scribble Preprocessor",
            category="Hyper-SD/controlnet",
            description="Turns a drawing (either polarity) or a photo into the white-on-black lines "
            "that scribble ControlNets expect, at the image's resolution.",
            inputs=[
                io.Image.Input("image", tooltip="Drawn canvas or photo (IMAGE batch)."),
                io.Combo.Input(
                    "source", options=list(SOURCES), default="drawing",
                    tooltip="drawing: strokes on a plain canvas; photo: derive a sketch with a "
                    "difference of Gaussians.",
                ),
                io.Combo.Input(
                    "polarity", options=list(POLARITIES), default="auto",
                    tooltip="Drawing only. auto: decide per image from the border (majority when "
                    "unclear); or say whether the strokes are dark on light (inverted) or already "
                    "light on dark.",
                ),
                io.Float.Input(
                    "threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                    tooltip="Stroke threshold. Drawing: on stroke brightness; photo: relative to "
                    "the strongest edge (lower keeps more lines).",
                ),
                io.Float.Input(
                    "dog_sigma", default=1.0, min=0.3, max=10.0, step=0.1,
                    tooltip="Photo only: blur radius (pixels) of the fine Gaussian; larger gives "
                    "bolder, fewer lines.",
                ),
                io.Int.Input(
                    "thickness", default=0, min=0, max=16,
                    tooltip="Thicken the lines by this many pixels (scribble models like bold strokes).",
                ),
            ],
            outputs=[io.Image.Output(display_name="scribble")],
        )

    @classmethod
    def execute(cls, image, source, polarity, threshold, dog_sigma, thickness) -> io.NodeOutput:
        return io.NodeOutput(scribble_lines(image, source, polarity, threshold, dog_sigma, thickness))


NODES = [HyperSDScribblePreprocessor]
