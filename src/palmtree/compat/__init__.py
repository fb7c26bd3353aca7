"""Drop-in replacements for the loss classes of other libraries.

``palmtree.compat.open_clip.ClipLoss``: open_clip's ``ClipLoss`` (same constructor and
``forward``), computing the exact global loss on any number of ranks and any split.

Each submodule is imported on demand; none of them imports the library it replaces.
"""
