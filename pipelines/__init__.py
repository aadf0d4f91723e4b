"""Kubeflow pipelines: wiring of the `components/` into the DyME DAG; compiled YAML committed beside them."""
