"""Segment Anything compression for Hugging Face ``SamModel``: SlimSAM pruning and MobileSAM distillation.

* :func:`slim` (``SlimConfig(ratio=...)``): SlimSAM's alternate slimming of the
  image encoder, embedding width then attention/MLP widths, each pruned by
  disturbed Taylor importance and distilled against the teacher; the result is
  a plain, smaller ``SamModel``.
* :func:`distill` (``DistillConfig``): MobileSAM's decoupled distillation of a
  small ``SamVisionEncoder`` into the teacher's embeddings, keeping its prompt
  encoder and mask decoder.
* :func:`importance`: the disturbed Taylor scores of every prunable channel.
* :func:`evaluate`: mIoU with box, one-point and three-point prompts, against
  the true masks and the teacher's, and the encoder's parameters, MACs and
  CPU latency.
* :func:`load_sam` loads the shipped ``sam-shapes`` model (trained by
  :mod:`toolkit.recipes.train_sam` with :func:`mask_loss` on
  :mod:`toolkit.data.segments` images, shipped by :mod:`toolkit.recipes.ship_sam`)
  and its compressed versions; :func:`segment` runs any ``SamModel`` on an image
  of any size with prompts in its own pixels; :func:`as_stored` is a model as it
  loads after being stored in another dtype.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["loss", "metrics", "mobilesam", "model", "prompts", "slimsam"],
    submod_attrs={
        "slimsam": ["SlimConfig", "slim", "taylor_scores", "importance", "widths_for"],
        "mobilesam": ["DistillConfig", "distill", "student_config"],
        "metrics": ["evaluate", "encoder_cost"],
        "model": ["load_sam", "build_sam", "sam_config", "make_processor", "segment", "Prompts", "predict",
                  "as_stored"],
        "loss": ["mask_loss"],
        "prompts": ["make_batch", "KINDS"],
    },
)
