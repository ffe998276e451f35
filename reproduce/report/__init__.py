"""Reporting: Table 2 and the ablation table, the claim check, figures, executed notebooks."""
