"""``wsss run`` / ``wsss demo``: the whole pipeline from one YAML.

- :mod:`~wsss.pipeline.config`: the typed configuration (``load_config``, ``PipelineConfig``).
- :mod:`~wsss.pipeline.manifest`: hashes and manifests, the skip/resume/afresh decision.
- :mod:`~wsss.pipeline.steps`: the steps, each one stage call (``STEPS``, ``STAGES``).
- :mod:`~wsss.pipeline.results`: ``results.json`` and the printed table.
- :mod:`~wsss.pipeline.run`: ``run_pipeline`` and the ``wsss run`` / ``wsss demo`` commands.
"""
from wsss.pipeline.config import PipelineConfig, load_config
from wsss.pipeline.steps import STAGES

__all__ = ["STAGES", "PipelineConfig", "load_config"]
