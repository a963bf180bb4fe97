"""The `harden` command line: `app` (the one module that imports click: parse, call, map errors to exit codes), the
options as data (`options`), harden.toml (`config`), the checks at a command's boundary (`boundary`), SIGTERM as
Ctrl-C (`signals`), one module per command (`commands/`) and the generated reference (`docs`). Nothing in the library
imports from here."""
