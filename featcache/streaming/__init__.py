"""Full-backbone methods: trainable parts injected into an unmodified open_clip model (wrappers around its
blocks, never a fork of its code). Images flow through the backbone while training."""
