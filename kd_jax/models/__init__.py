"""Models and their registry (`kd_jax.models.registry`). Importing this package registers every
built-in model, pretrained preset and weights-file kind; a new model module registers itself the
same way (README, "Add a method")."""

from kd_jax.models import (  # noqa: F401  (imported to register their entries)
    bert,
    bert_loading,
    bert_mlm,
    capture,
    cifar,
    cnn,
    cross_tokenizer,
    deeplab,
    gguf_loading,
    lad,
    llama,
    monotakd,
    polyvilt,
    segformer,
    segformer_loading,
    transkd,
    vilt,
    vilt_loading,
    wrappers,
    zoo_adapters,
)
from kd_jax.models.registry import (
    MODELS,
    PRESETS,
    WEIGHT_FILES,
    batch_inputs,
    build,
    check_shapes,
    entry,
    input_keys,
    names,
    register,
    shape_mismatches,
    tokenizer_name,
)

__all__ = [
    "MODELS",
    "PRESETS",
    "WEIGHT_FILES",
    "batch_inputs",
    "build",
    "check_shapes",
    "entry",
    "input_keys",
    "names",
    "register",
    "shape_mismatches",
    "tokenizer_name",
]
