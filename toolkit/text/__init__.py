"""The lm codec's engine, as a library: tokens, engines, n-gram mixing, adaptation, the lockstep coder.

- :mod:`toolkit.text.detect`: is a chunk text (cheap, no torch);
- :mod:`toolkit.text.transforms`: exact text transforms (wrapped lines, line numbers) with side data;
- :mod:`toolkit.text.tokens`: tokenizers as the coder sees them;
- :mod:`toolkit.text.integer`: the integer engine (the default; the same numbers on every machine), with
  its compiled loops (:mod:`toolkit.text.intkernels`) and fixed-point tables (:mod:`toolkit.text.fixed`);
  its calibrated weights come from the ``calibrate_lm`` recipe; :mod:`toolkit.text.llama` says which
  configs it runs;
- :mod:`toolkit.text.engines`: the float engines, machine-bound: the lean Llama forward and the ``transformers`` one;
- :mod:`toolkit.text.mixer`, :mod:`toolkit.text.adapt`: the file's n-gram counts and adapted head;
- :mod:`toolkit.text.plan`: how a batch's segments become streams;
- :mod:`toolkit.text.lockstep`: the coding loop encoder and decoder share;
- :mod:`toolkit.text.model`: a model, its tokenizer and hashes, through the model store.

It knows no file format: :mod:`toolkit.codecs.lm` maps settings and payload bytes onto it.
Submodules load on use, so ``toolkit.text.detect`` stays cheap.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["adapt", "detect", "engines", "fixed", "integer", "intkernels", "llama",
                "lockstep", "mixer", "model", "plan", "tokens", "transforms"],
    submod_attrs={
        "detect": ["looks_like_text"],
        "lockstep": ["Lockstep", "Stream"],
        "model": ["CodingModel", "load_coding_model"],
        "plan": ["plan_pieces"],
    },
)
