"""The base model as harden sees it: a classifier on [0, 1] pixels with its input spec (`classifier`), the
architecture named by `--arch`/`arch=` and what the trust model lets it import (`archspec`), and Hugging Face folders
loaded by transformers (`hf`)."""
