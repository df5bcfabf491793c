"""Full-backbone methods: trainable parts injected into an unmodified open_clip model (wrappers around its
blocks, never a fork of its code). Images flow through the backbone while training."""


def streamed_methods() -> dict[str, type]:
    """Full-backbone methods by name (classification and retrieval) with their config classes. They read the
    dataset's images, not a store; imported lazily since their modules pull in the backbone code."""
    from .retrieval_trainer import METHODS as RETRIEVAL
    from .trainer import METHODS

    return {**METHODS, **RETRIEVAL}
