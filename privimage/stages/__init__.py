"""Pipeline stages, one module each with a single public ``run(cfg, run_dir)``.

Stages talk only through files in the run directory (see each module's docstring for
the fixed names it reads and writes), never through in-memory objects.
"""

from types import ModuleType

from privimage.config.schema import Config
from privimage.stages import audit, evaluate, finetune, pretrain, query, sample, sample_bnstat

STAGE_MODULES = {
    "query": query,
    "pretrain": pretrain,
    "finetune": finetune,
    "sample": sample,
    "evaluate": evaluate,
    "audit": audit,
}


def stage_module(cfg: Config, name: str) -> ModuleType:
    """The module that runs stage ``name`` for ``cfg``: the synthesizer picks the sample
    stage (BN-statistics synthesis writes the same files as diffusion sampling)."""
    if name == "sample" and cfg.synthesizer == "bnstat":
        return sample_bnstat
    return STAGE_MODULES[name]
