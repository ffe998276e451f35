"""The pipeline's code: data, training engine, evaluation, tables and figures (one CLI per stage)."""
