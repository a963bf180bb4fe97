"""What every run shares: the console (results on stdout, progress on stderr), time estimates (`clock`), and the
processes of a torchrun world (`distributed`)."""
