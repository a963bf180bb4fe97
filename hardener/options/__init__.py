"""Options as data, torch-free (so that `harden --help` stays fast): the choices offered (`choices`), how a patch kind or
method declares an option (`optspec`) and the built-in declarations (`kind_options`), the registries walked
(`owners`), `PatchOptions` (`patch_options`), what a recipe asks for (`recipe`) and the value, field and path rules
(`validate`)."""
