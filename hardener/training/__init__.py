"""Training the patches: the trainer loop (`fit`), the caches of a frozen base's answers (`cache`), the steps of a patch
run (`steps`) and the run itself, for `hardener.patch` and `harden patch` alike (`run`)."""
