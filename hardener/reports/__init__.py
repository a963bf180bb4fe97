"""Reports: the typed results an evaluation makes (`results`: per attack, threat model and model, masks as fields);
JSON (the published schema in `schemas/`), Markdown, HTML and rich tables, gates (`report`); MLflow (`tracking`)."""
