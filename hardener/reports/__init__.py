"""Reports: JSON (the published schema in `schemas/`), Markdown, HTML and rich tables, gates (`report`); MLflow
(`tracking`)."""
