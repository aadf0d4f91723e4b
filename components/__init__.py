"""Kubeflow Pipelines components: one thin shell per `dyme_core.steps` function (DESIGN.md section 5).

Each component takes the params.yaml text and `section.key=value` overrides, points the config's paths
at its KFP artifacts (`components.runtime.step_config`) and calls the same library function as the CLI.
The wiring lives in `pipelines/dyme_pipeline.py`; the image they run in is named in `components/image.py`.
"""
